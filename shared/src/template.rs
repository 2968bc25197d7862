//! `{name}` placeholders in pipeline arguments, paths and environment values.
//!
//! A template is plain text with `{name}` placeholders; `{{` and `}}` stand for literal braces.
//! An unknown placeholder is an error, never an empty string, and an unclosed brace is an error
//! too: a typo in a config must stop the pipeline before anything runs.

/// A template that cannot be parsed or rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// `{` without a matching `}` (or a stray `}`).
    #[error(
        "unbalanced brace at byte {at} in `{template}`: write `{{{{` or `}}}}` for a literal brace"
    )]
    Unbalanced {
        /// The template.
        template: String,
        /// Byte offset of the offending brace.
        at: usize,
    },
    /// A placeholder name nothing defines.
    #[error("unknown placeholder `{{{name}}}` in `{template}`")]
    Unknown {
        /// The template.
        template: String,
        /// The placeholder's name.
        name: String,
    },
}

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece<'a> {
    Text(&'a str),
    Brace(char),
    Var(&'a str),
}

fn parse(template: &str) -> Result<Vec<Piece<'_>>, TemplateError> {
    let mut pieces = Vec::new();
    let bytes = template.as_bytes();
    let (mut i, mut start) = (0, 0);
    let unbalanced = |at| TemplateError::Unbalanced {
        template: template.to_string(),
        at,
    };
    while i < bytes.len() {
        match bytes[i] {
            b'{' | b'}' if bytes.get(i + 1) == Some(&bytes[i]) => {
                pieces.push(Piece::Text(&template[start..i]));
                pieces.push(Piece::Brace(bytes[i] as char));
                i += 2;
                start = i;
            }
            b'{' => {
                let end = template[i + 1..]
                    .find(['{', '}'])
                    .map(|o| i + 1 + o)
                    .filter(|&e| bytes[e] == b'}')
                    .ok_or_else(|| unbalanced(i))?;
                let name = &template[i + 1..end];
                if name.trim().is_empty() {
                    return Err(unbalanced(i));
                }
                pieces.push(Piece::Text(&template[start..i]));
                pieces.push(Piece::Var(name.trim()));
                i = end + 1;
                start = i;
            }
            b'}' => return Err(unbalanced(i)),
            _ => i += 1,
        }
    }
    pieces.push(Piece::Text(&template[start..]));
    Ok(pieces)
}

/// The placeholder names a template uses, in order of appearance.
pub fn placeholders(template: &str) -> Result<Vec<&str>, TemplateError> {
    Ok(parse(template)?
        .into_iter()
        .filter_map(|p| match p {
            Piece::Var(v) => Some(v),
            _ => None,
        })
        .collect())
}

/// Renders a template, looking each placeholder up with `lookup`.
pub fn render(
    template: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(template.len());
    for piece in parse(template)? {
        match piece {
            Piece::Text(t) => out.push_str(t),
            Piece::Brace(c) => out.push(c),
            Piece::Var(name) => {
                out.push_str(&lookup(name).ok_or_else(|| TemplateError::Unknown {
                    template: template.to_string(),
                    name: name.to_string(),
                })?)
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(name: &str) -> Option<String> {
        match name {
            "month" => Some("2024-01".into()),
            "dataset" => Some("sales".into()),
            _ => None,
        }
    }

    #[test]
    fn renders_known_placeholders_and_escapes() {
        assert_eq!(
            render("data/{dataset}/{month}.csv", vars).unwrap(),
            "data/sales/2024-01.csv"
        );
        assert_eq!(
            render("{{literal}} {month}", vars).unwrap(),
            "{literal} 2024-01"
        );
        assert_eq!(render("plain", vars).unwrap(), "plain");
    }

    #[test]
    fn unknown_placeholder_is_an_error() {
        let err = render("{month}/{mnth}", vars).unwrap_err();
        assert_eq!(
            err,
            TemplateError::Unknown {
                template: "{month}/{mnth}".into(),
                name: "mnth".into()
            }
        );
        assert!(err.to_string().contains("`{mnth}`"));
    }

    #[test]
    fn unbalanced_braces_are_errors() {
        for bad in ["{month", "month}", "{}", "{a{b}"] {
            assert!(
                matches!(parse(bad), Err(TemplateError::Unbalanced { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn lists_placeholders() {
        assert_eq!(placeholders("{a}-{b}{{c}}").unwrap(), vec!["a", "b"]);
    }
}
