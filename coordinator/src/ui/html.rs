//! Building HTML safely: every piece of text that is not markup goes through [`esc`] (or
//! [`Html::text`]), so run reasons, partition keys and log tails — untrusted text — can never
//! become markup.

use std::fmt::Write;

/// Escapes text for an HTML element or a double-quoted attribute.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a query value (unreserved characters kept).
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A string of markup being built; text goes in escaped.
#[derive(Debug, Default)]
pub struct Html(String);

impl Html {
    /// Empty.
    pub fn new() -> Html {
        Html(String::with_capacity(4096))
    }

    /// Appends trusted markup (a literal written in this crate).
    pub fn raw(&mut self, markup: &str) -> &mut Html {
        self.0.push_str(markup);
        self
    }

    /// Appends text, escaped.
    pub fn text(&mut self, text: &str) -> &mut Html {
        self.0.push_str(&esc(text));
        self
    }

    /// `<tag>text</tag>` with the text escaped.
    pub fn el(&mut self, tag: &str, text: &str) -> &mut Html {
        let _ = write!(self.0, "<{tag}>{}</{tag}>", esc(text));
        self
    }

    /// The markup.
    pub fn finish(self) -> String {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_in_text_is_escaped() {
        assert_eq!(
            esc(r#"<script>alert("x")</script> & 'y'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
        let mut h = Html::new();
        h.raw("<td>").text("<b>").raw("</td>").el("pre", "a<b");
        assert_eq!(h.finish(), "<td>&lt;b&gt;</td><pre>a&lt;b</pre>");
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(url_encode("/b/x y?&="), "/b/x%20y%3F%26%3D");
    }
}
