//! `{name}` placeholders in pipeline commands, arguments, paths and environment values.
//!
//! A template is plain text with `{name}` placeholders; `{{` and `}}` stand for literal braces.
//! An unknown placeholder is an error, never an empty string, and an unclosed brace is an error
//! too: a typo in a config must stop the pipeline before anything runs.
//!
//! A placeholder may carry a **format** and **filters**: `{name:FORMAT|filter|filter}`.
//! - FORMAT is a strftime pattern applied to a date value (`YYYY-MM`, read as the month's first
//!   day, or `YYYY-MM-DD`): `{month:%B-%Y}` → `January-2024`, `{month:%Y%m}` → `202401`.
//! - Filters apply in order: `lower`, `upper`, `slug` (lower case, runs of anything but letters
//!   and digits become one `-`). `{month:%B-%Y|lower}` → `january-2024`.
//!
//! References to **secrets** are resolved only where the tool runs, never by the coordinator:
//! `{env:NAME}` (the worker's environment) and `{secret:NAME}` (a file in the worker's
//! secrets directory). [`render_deferred`] renders everything else and leaves those in place,
//! so the text that travels in a StepSpec and lands in the audit log never holds a secret.

use chrono::NaiveDate;
use chrono::format::{Item, StrftimeItems};

/// The filters a placeholder may use.
pub const FILTERS: [&str; 3] = ["lower", "upper", "slug"];

/// The namespaces of placeholders resolved by the worker, not by the coordinator.
pub const DEFERRED_NAMESPACES: [&str; 2] = ["env", "secret"];

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
    /// A format or filter that does not exist, or a malformed secret reference.
    #[error("bad placeholder `{{{placeholder}}}` in `{template}`: {reason}")]
    Spec {
        /// The template.
        template: String,
        /// The placeholder as written.
        placeholder: String,
        /// What is wrong and what is expected.
        reason: String,
    },
    /// A format applied to a value that is not a date.
    #[error(
        "placeholder `{{{placeholder}}}` in `{template}`: cannot apply format `{format}` to `{value}`: expected a date such as 2024-01 or 2024-01-31"
    )]
    NotADate {
        /// The template.
        template: String,
        /// The placeholder as written.
        placeholder: String,
        /// The format.
        format: String,
        /// The value it was applied to.
        value: String,
    },
}

/// One `{...}` of a template: the name, an optional format and the filters, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placeholder<'a> {
    /// The name (`month`, `artefacts.raw`, `env:DATABASE_URL`).
    pub name: &'a str,
    /// The strftime format after `:`, if any.
    pub format: Option<&'a str>,
    /// The filters after `|`, in order.
    pub filters: Vec<&'a str>,
    /// The whole text between the braces, trimmed.
    pub raw: &'a str,
}

impl Placeholder<'_> {
    /// `env` or `secret` when this is a reference the worker resolves, with the name after it.
    pub fn deferred(&self) -> Option<(&str, &str)> {
        let (ns, name) = self.name.split_once(':')?;
        DEFERRED_NAMESPACES.contains(&ns).then_some((ns, name))
    }
}

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece<'a> {
    Text(&'a str),
    Brace(char),
    Var(Placeholder<'a>),
}

fn parse_placeholder<'a>(template: &str, raw: &'a str) -> Result<Placeholder<'a>, TemplateError> {
    let bad = |reason: String| TemplateError::Spec {
        template: template.to_string(),
        placeholder: raw.to_string(),
        reason,
    };
    // `{env:NAME}` and `{secret:NAME}`: a namespace, a name, nothing else.
    if let Some((ns, name)) = raw.split_once(':')
        && DEFERRED_NAMESPACES.contains(&ns.trim())
    {
        let name = name.trim();
        let ok = !name.is_empty()
            && name.len() <= 128
            && name.as_bytes()[0].is_ascii_alphabetic()
            && name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'));
        if !ok {
            return Err(bad(format!(
                "expected `{{{}:NAME}}` with a NAME of letters, digits, `_`, `-` and `.`, starting with a letter",
                ns.trim()
            )));
        }
        return Ok(Placeholder {
            name: raw,
            format: None,
            filters: Vec::new(),
            raw,
        });
    }
    let mut parts = raw.split('|');
    let head = parts.next().unwrap_or_default();
    let (name, format) = match head.split_once(':') {
        Some((n, f)) => (n.trim(), Some(f)),
        None => (head.trim(), None),
    };
    if name.is_empty() {
        return Err(bad("expected a name before `:` or `|`".into()));
    }
    if let Some(f) = format {
        if f.is_empty() {
            return Err(bad(
                "expected a strftime format after `:`, e.g. `{month:%B-%Y}`".into(),
            ));
        }
        if StrftimeItems::new(f).any(|i| matches!(i, Item::Error)) {
            return Err(bad(format!(
                "`{f}` is not a valid strftime format (e.g. `%Y%m`, `%B-%Y`, `%b %Y`)"
            )));
        }
    }
    let mut filters = Vec::new();
    for f in parts {
        let f = f.trim();
        if !FILTERS.contains(&f) {
            return Err(bad(format!(
                "unknown filter `{f}`: expected one of {}",
                FILTERS.join(", ")
            )));
        }
        filters.push(f);
    }
    Ok(Placeholder {
        name,
        format,
        filters,
        raw,
    })
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
                let raw = template[i + 1..end].trim();
                if raw.is_empty() {
                    return Err(unbalanced(i));
                }
                pieces.push(Piece::Text(&template[start..i]));
                pieces.push(Piece::Var(parse_placeholder(template, raw)?));
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

/// The placeholder names a template uses, in order of appearance (without formats or filters;
/// secret references as `env:NAME` / `secret:NAME`).
pub fn placeholders(template: &str) -> Result<Vec<&str>, TemplateError> {
    Ok(parse_placeholders(template)?
        .into_iter()
        .map(|p| p.name)
        .collect())
}

/// Every placeholder of a template, parsed, in order of appearance.
pub fn parse_placeholders(template: &str) -> Result<Vec<Placeholder<'_>>, TemplateError> {
    Ok(parse(template)?
        .into_iter()
        .filter_map(|p| match p {
            Piece::Var(v) => Some(v),
            _ => None,
        })
        .collect())
}

/// Applies a placeholder's format and filters to its value.
fn apply(template: &str, p: &Placeholder<'_>, value: String) -> Result<String, TemplateError> {
    let mut out = value;
    if let Some(format) = p.format {
        let date = NaiveDate::parse_from_str(&format!("{out}-01"), "%Y-%m-%d")
            .or_else(|_| NaiveDate::parse_from_str(&out, "%Y-%m-%d"))
            .map_err(|_| TemplateError::NotADate {
                template: template.to_string(),
                placeholder: p.raw.to_string(),
                format: format.to_string(),
                value: out.clone(),
            })?;
        out = date.format(format).to_string();
    }
    for f in &p.filters {
        out = match *f {
            "lower" => out.to_lowercase(),
            "upper" => out.to_uppercase(),
            _ => slug(&out),
        };
    }
    Ok(out)
}

/// Lower case; every run of characters other than letters and digits becomes one `-`, with none
/// at either end.
fn slug(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_alphanumeric() {
            out.extend(c.to_lowercase());
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    while out.ends_with('-') {
        out.pop();
    }
    out
}

/// Renders a template, looking each placeholder up by name with `lookup` and then applying its
/// format and filters.
pub fn render(
    template: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(template.len());
    for piece in parse(template)? {
        match piece {
            Piece::Text(t) => out.push_str(t),
            Piece::Brace(c) => out.push(c),
            Piece::Var(p) => {
                let value = lookup(p.name).ok_or_else(|| TemplateError::Unknown {
                    template: template.to_string(),
                    name: p.name.to_string(),
                })?;
                out.push_str(&apply(template, &p, value)?);
            }
        }
    }
    Ok(out)
}

/// A rendering that may have left worker-side references in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rendered {
    /// Plain text: nothing left to resolve.
    Text(String),
    /// Still a template: every literal brace is escaped (`{{`, `}}`) and each `{env:NAME}` /
    /// `{secret:NAME}` is kept, for [`render`] on the worker.
    Deferred(String),
}

impl Rendered {
    /// The text, whichever it is.
    pub fn as_str(&self) -> &str {
        match self {
            Rendered::Text(s) | Rendered::Deferred(s) => s,
        }
    }
}

/// Renders what `lookup` knows and keeps `{env:…}` and `{secret:…}` references, and those whose
/// name `defer` picks, for the worker.
pub fn render_deferred(
    template: &str,
    lookup: impl Fn(&str) -> Option<String>,
    defer: impl Fn(&str) -> bool,
) -> Result<Rendered, TemplateError> {
    let pieces = parse(template)?;
    let deferred = |v: &Placeholder<'_>| v.deferred().is_some() || defer(v.name);
    if !pieces
        .iter()
        .any(|p| matches!(p, Piece::Var(v) if deferred(v)))
    {
        return render(template, lookup).map(Rendered::Text);
    }
    let escape = |s: &str| s.replace('{', "{{").replace('}', "}}");
    let mut out = String::with_capacity(template.len());
    for piece in pieces {
        match piece {
            Piece::Text(t) => out.push_str(&escape(t)),
            Piece::Brace(c) => {
                out.push(c);
                out.push(c);
            }
            Piece::Var(p) if deferred(&p) => {
                out.push('{');
                out.push_str(p.raw);
                out.push('}');
            }
            Piece::Var(p) => {
                let value = lookup(p.name).ok_or_else(|| TemplateError::Unknown {
                    template: template.to_string(),
                    name: p.name.to_string(),
                })?;
                out.push_str(&escape(&apply(template, &p, value)?));
            }
        }
    }
    Ok(Rendered::Deferred(out))
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

    #[test]
    fn formats_dates_and_applies_filters() {
        assert_eq!(render("{month:%B-%Y|lower}", vars).unwrap(), "january-2024");
        assert_eq!(render("{month:%Y%m}", vars).unwrap(), "202401");
        assert_eq!(render("{ month:%b %Y| upper }", vars).unwrap(), "JAN 2024");
        assert_eq!(render("{dataset|upper}", vars).unwrap(), "SALES");
        let day = |_: &str| Some("2024-02-29".to_string());
        assert_eq!(render("{d:%d %B}", day).unwrap(), "29 February");
        let title = |_: &str| Some("A&E Attendances (Type 1)".to_string());
        assert_eq!(render("{t|slug}", title).unwrap(), "a-e-attendances-type-1");
    }

    #[test]
    fn bad_formats_filters_and_values_are_errors() {
        let err = render("{month:%Q}", vars).unwrap_err();
        assert!(matches!(err, TemplateError::Spec { .. }), "{err}");
        let err = render("{month|title}", vars).unwrap_err();
        assert!(err.to_string().contains("unknown filter `title`"), "{err}");
        let err = render("{dataset:%Y}", vars).unwrap_err();
        assert!(matches!(err, TemplateError::NotADate { .. }), "{err}");
        assert!(err.to_string().contains("`sales`"), "{err}");
        // Checked when parsed, so a config check catches them without a value.
        assert!(placeholders("{month:%Q}").is_err());
        assert!(placeholders("{month|nope}").is_err());
        assert_eq!(placeholders("{month:%B|lower}").unwrap(), vec!["month"]);
    }

    #[test]
    fn secret_references_are_deferred_with_literal_braces_escaped() {
        let r = render_deferred("postgres://u:{env:DB_PASS}@{dataset}/{{x}}", vars, |_| {
            false
        })
        .unwrap();
        assert_eq!(
            r,
            Rendered::Deferred("postgres://u:{env:DB_PASS}@sales/{{x}}".into())
        );
        // The worker's pass resolves the reference and unescapes the braces.
        let worker = |n: &str| (n == "env:DB_PASS").then(|| "s3cret".to_string());
        assert_eq!(
            render(r.as_str(), worker).unwrap(),
            "postgres://u:s3cret@sales/{x}"
        );
        // A value holding braces survives the round trip.
        let braces = |n: &str| match n {
            "v" => Some("{a}".to_string()),
            _ => None,
        };
        let r = render_deferred("{v}{secret:token}", braces, |_| false).unwrap();
        assert_eq!(r.as_str(), "{{a}}{secret:token}");
        assert_eq!(render(r.as_str(), |_| Some("T".into())).unwrap(), "{a}T");
        assert_eq!(
            render_deferred("{month}", vars, |_| false).unwrap(),
            Rendered::Text("2024-01".into())
        );
        assert_eq!(
            render_deferred("{month}/{artefacts.out}", vars, |n| n == "artefacts.out").unwrap(),
            Rendered::Deferred("2024-01/{artefacts.out}".into())
        );
        assert!(placeholders("{env:}").is_err());
        assert!(placeholders("{secret:../x}").is_err());
        assert_eq!(
            placeholders("{secret:db-pass}").unwrap(),
            vec!["secret:db-pass"]
        );
    }
}
