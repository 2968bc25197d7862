//! Failure classification: which failures a retry can fix.
//!
//! A failed attempt is read against an ordered list of [`FailureRule`]s — the step's own, then
//! the pipeline's, then (unless turned off) the built-in table ([`builtin_rules`]) — and the first
//! rule whose every condition holds decides its [`FailureClass`]: `transient` (a retry may fix
//! it), `permanent` (it will not) or `escalate` (ask an operator). When no rule holds, the
//! failure is `unclassified`. The result is a [`FailureFact`] carried in
//! [`StepResult::failure`](crate::contracts::StepResult::failure): the class, the rule that
//! decided it, and the log line that explains the failure (stream and line number), so that
//! every reason can quote the cause rather than the last line printed.
//!
//! Patterns are regular expressions matched case-insensitively (unless a rule says otherwise)
//! against the captured log tail with ANSI colour codes and carriage-return progress removed, in
//! two views: line by line (so `^` and `$` anchor at line ends, `(?m)`), and with every line
//! trimmed and joined by single spaces, so that a message a console library wrapped at 80
//! columns (`… failed: Connection` / `refused`) still matches `Connection refused`. Within a
//! stream the last match wins (the failure is usually near the end); standard error is searched
//! before standard output.
//!
//! This module is pure: the executor calls [`classify`] on the tails it captured, and the rules
//! agent calls it on [`StepResult::log_tail`](crate::contracts::StepResult::log_tail) when a
//! result arrives without a classification (from an older worker).

use std::sync::LazyLock;

use regex::{Regex, RegexBuilder};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::contracts::{CausalLine, FailureClass, FailureFact, LogStream};

/// One classification rule: every condition given must hold; at least one must be given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FailureRule {
    /// A name for reasons (default: the rule's conditions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A regular expression (Rust `regex` syntax) some log line must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// Which log the pattern reads (default both).
    #[serde(default, skip_serializing_if = "is_both")]
    pub stream: LogStream,
    /// Match the pattern case-sensitively (default: case-insensitively).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub case_sensitive: bool,
    /// The exit code must be one of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exit_codes: Vec<i32>,
    /// The tool must have been ended by one of these signals.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signals: Vec<i32>,
    /// The attempt must (true) or must not (false) have passed its `timeout_s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timed_out: Option<bool>,
    /// What a failure this rule matches is: `transient`, `permanent` or `escalate`.
    pub class: FailureClass,
}

fn is_both(s: &LogStream) -> bool {
    *s == LogStream::Both
}

/// A `failures` section (pipeline-wide, or one step's override).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FailuresConfig {
    /// Rules tried in order before the built-in table (a step's before the pipeline's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<FailureRule>,
    /// Whether the built-in table follows the rules (default true; a step's setting wins
    /// over the pipeline's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<bool>,
}

impl FailuresConfig {
    /// A step's effective rules: its own, then the pipeline's; `builtin` resolved.
    pub fn layered(step: Option<&FailuresConfig>, pipeline: &FailuresConfig) -> FailuresConfig {
        let mut rules = step.map(|s| s.rules.clone()).unwrap_or_default();
        rules.extend(pipeline.rules.iter().cloned());
        let builtin = step
            .and_then(|s| s.builtin)
            .or(pipeline.builtin)
            .unwrap_or(true);
        FailuresConfig {
            rules,
            builtin: Some(builtin),
        }
    }

    /// Checks every rule; the error is (JSON path below the section, message).
    pub fn check(&self) -> Result<(), (String, String)> {
        for (i, r) in self.rules.iter().enumerate() {
            let at = |f: &str| format!("rules[{i}]{f}");
            if r.pattern.is_none()
                && r.exit_codes.is_empty()
                && r.signals.is_empty()
                && r.timed_out.is_none()
            {
                return Err((
                    at(""),
                    "expected at least one condition: `pattern`, `exit_codes`, `signals` or `timed_out`".into(),
                ));
            }
            if r.class == FailureClass::Unclassified {
                return Err((
                    at(".class"),
                    "expected `transient`, `permanent` or `escalate`".into(),
                ));
            }
            if let Some(p) = &r.pattern
                && let Err(e) = compile(p, r.case_sensitive)
            {
                return Err((at(".pattern"), format!("invalid regex: {e}")));
            }
        }
        Ok(())
    }
}

/// What the classifier reads of one attempt.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttemptLog<'a> {
    /// The tool's exit code.
    pub exit_code: i32,
    /// The signal that ended it.
    pub signal: Option<i32>,
    /// Whether it passed its timeout.
    pub timed_out: bool,
    /// The tail of standard output.
    pub stdout: &'a str,
    /// The stream's line number of the tail's first line (1 when the tail is the whole log).
    pub stdout_first_line: u64,
    /// The tail of standard error.
    pub stderr: &'a str,
    /// The stream's line number of the tail's first line.
    pub stderr_first_line: u64,
}

/// The marker the executor writes between the two streams in `log_tail`.
pub const STDERR_MARKER: &str = "[--- stderr ---]";

impl<'a> AttemptLog<'a> {
    /// Splits a `StepResult.log_tail` into its streams. Line numbers count from the tail's
    /// start (the tail does not say how many lines were omitted before it).
    pub fn from_tail(tail: &'a str, exit_code: i32, signal: Option<i32>, timed_out: bool) -> Self {
        let strip_omitted = |s: &'a str| -> &'a str {
            match s.strip_prefix("[... ") {
                Some(rest) if rest.contains(" omitted ...]") => {
                    rest.split_once('\n').map(|(_, after)| after).unwrap_or("")
                }
                _ => s,
            }
        };
        let (out, err) = if let Some(rest) = tail.strip_prefix(STDERR_MARKER) {
            ("", rest.strip_prefix('\n').unwrap_or(rest))
        } else {
            match tail.split_once(&format!("\n{STDERR_MARKER}\n")) {
                Some((o, e)) => (o, e),
                None => (tail, ""),
            }
        };
        AttemptLog {
            exit_code,
            signal,
            timed_out,
            stdout: strip_omitted(out),
            stdout_first_line: 1,
            stderr: strip_omitted(err),
            stderr_first_line: 1,
        }
    }
}

/// Classifies a failed attempt. `rules` are tried first (in order), then the built-in table
/// when `builtin` is true. Never fails: an invalid user pattern (refused by the config check
/// long before) simply never matches.
pub fn classify(config: &FailuresConfig, log: &AttemptLog<'_>) -> FailureFact {
    let view = View::new(log);
    let user = config
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| (rule_label(r, &format!("rule {}", i + 1)), r));
    let user: Vec<(String, &FailureRule)> = user.collect();
    let builtin: Vec<(String, &FailureRule)> = if config.builtin.unwrap_or(true) {
        BUILTIN
            .iter()
            .map(|b| {
                (
                    format!("built-in: {}", b.rule.name.as_deref().unwrap_or("")),
                    &b.rule,
                )
            })
            .collect()
    } else {
        Vec::new()
    };
    for (label, rule) in user.iter().chain(builtin.iter()) {
        if !conditions_hold(rule, log) {
            continue;
        }
        let line = match &rule.pattern {
            Some(p) => {
                let Ok(re) = compile(p, rule.case_sensitive) else {
                    continue;
                };
                match view.find(&re, rule.stream) {
                    Some(line) => Some(line),
                    None => continue,
                }
            }
            None => view.cause_line(),
        };
        return FailureFact {
            class: rule.class,
            rule: label.clone(),
            line,
        };
    }
    FailureFact {
        class: FailureClass::Unclassified,
        rule: "no rule matched".into(),
        line: view.cause_line(),
    }
}

/// The built-in table, in the order it is tried (for documentation and tests).
pub fn builtin_rules() -> Vec<FailureRule> {
    BUILTIN.iter().map(|b| b.rule.clone()).collect()
}

fn conditions_hold(rule: &FailureRule, log: &AttemptLog<'_>) -> bool {
    (rule.exit_codes.is_empty() || rule.exit_codes.contains(&log.exit_code))
        && (rule.signals.is_empty() || log.signal.is_some_and(|s| rule.signals.contains(&s)))
        && rule.timed_out.is_none_or(|t| t == log.timed_out)
}

fn rule_label(r: &FailureRule, fallback: &str) -> String {
    if let Some(n) = &r.name {
        return n.clone();
    }
    let mut parts = Vec::new();
    if let Some(p) = &r.pattern {
        parts.push(format!("pattern `{p}`"));
    }
    if !r.exit_codes.is_empty() {
        let codes: Vec<String> = r.exit_codes.iter().map(|c| c.to_string()).collect();
        parts.push(format!("exit codes {}", codes.join(", ")));
    }
    if !r.signals.is_empty() {
        let s: Vec<String> = r.signals.iter().map(|c| c.to_string()).collect();
        parts.push(format!("signals {}", s.join(", ")));
    }
    if let Some(t) = r.timed_out {
        parts.push(format!("timed_out {t}"));
    }
    if parts.is_empty() {
        fallback.to_string()
    } else {
        format!("{fallback} ({})", parts.join(", "))
    }
}

fn compile(pattern: &str, case_sensitive: bool) -> Result<Regex, regex::Error> {
    RegexBuilder::new(pattern)
        .case_insensitive(!case_sensitive)
        .multi_line(true)
        .size_limit(1 << 22)
        .build()
}

/// How many characters of a causal line a fact quotes.
const QUOTED_CHARS: usize = 240;

/// One stream's tail, cleaned, in the two views patterns are matched against.
struct StreamView {
    stream: LogStream,
    first_line: u64,
    /// Cleaned lines (ANSI codes and carriage-return overwrites removed, right-trimmed).
    lines: Vec<String>,
    /// The lines joined by `\n`, with each line's start offset.
    by_line: String,
    by_line_starts: Vec<usize>,
    /// Non-empty lines trimmed, inner whitespace collapsed, joined by one space; with each
    /// line's start offset and index.
    joined: String,
    joined_starts: Vec<(usize, usize)>,
}

struct View {
    /// Standard error first: that is where tools put their errors.
    streams: Vec<StreamView>,
}

static ANSI: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
        .expect("valid regex")
});

/// Strips colour codes and keeps what a terminal would show of a line rewritten with `\r`.
pub fn clean_line(raw: &str) -> String {
    let no_ansi = ANSI.replace_all(raw, "");
    let shown = no_ansi
        .trim_end_matches('\r')
        .rsplit('\r')
        .next()
        .unwrap_or("");
    shown.trim_end().to_string()
}

impl StreamView {
    fn new(stream: LogStream, text: &str, first_line: u64) -> Self {
        let lines: Vec<String> = text.lines().map(clean_line).collect();
        let mut by_line = String::new();
        let mut by_line_starts = Vec::with_capacity(lines.len());
        let mut joined = String::new();
        let mut joined_starts = Vec::new();
        for (i, l) in lines.iter().enumerate() {
            by_line_starts.push(by_line.len());
            by_line.push_str(l);
            by_line.push('\n');
            let words: Vec<&str> = l.split_whitespace().collect();
            if !words.is_empty() {
                if !joined.is_empty() {
                    joined.push(' ');
                }
                joined_starts.push((joined.len(), i));
                joined.push_str(&words.join(" "));
            }
        }
        StreamView {
            stream,
            first_line,
            lines,
            by_line,
            by_line_starts,
            joined,
            joined_starts,
        }
    }

    /// The last match of `re` in this stream, as (first line index, last line index).
    fn find(&self, re: &Regex) -> Option<(usize, usize)> {
        if let Some(m) = re.find_iter(&self.by_line).last() {
            let line_at = |off: usize| self.by_line_starts.partition_point(|&s| s <= off) - 1;
            let end = m.end().saturating_sub(1).max(m.start());
            return Some((line_at(m.start()), line_at(end)));
        }
        let m = re.find_iter(&self.joined).last()?;
        let line_at = |off: usize| {
            let i = self.joined_starts.partition_point(|&(s, _)| s <= off);
            self.joined_starts[i.saturating_sub(1)].1
        };
        let end = m.end().saturating_sub(1).max(m.start());
        Some((line_at(m.start()), line_at(end)))
    }

    fn cite(&self, first: usize, last: usize) -> CausalLine {
        let text: Vec<&str> = self.lines[first..=last]
            .iter()
            .map(|l| l.trim())
            .filter(|l| !l.is_empty())
            .collect();
        CausalLine {
            stream: self.stream,
            line: self.first_line + first as u64,
            text: quote(&text.join(" ")),
        }
    }
}

/// Lines that look like the explanation of a failure, for rules without a pattern and for
/// unclassified failures.
static ERRORISH: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\b(error|fatal|failed|failure|exception|critical|panic(ked)?|refused|denied|cannot|could not|unable|timed out|abort(ed)?|killed)\b")
        .expect("valid regex")
});
/// Lines that say little on their own (`❌ Error: 1`, `Error: exit status 1`) or are warnings.
static UNINFORMATIVE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)^\W*(error|failed|failure)\W*(\d+|exit (status|code) \d+)?\W*$|warning")
        .expect("valid regex")
});

impl View {
    fn new(log: &AttemptLog<'_>) -> Self {
        View {
            streams: vec![
                StreamView::new(LogStream::Stderr, log.stderr, log.stderr_first_line.max(1)),
                StreamView::new(LogStream::Stdout, log.stdout, log.stdout_first_line.max(1)),
            ],
        }
    }

    fn find(&self, re: &Regex, stream: LogStream) -> Option<CausalLine> {
        self.streams
            .iter()
            .filter(|s| stream == LogStream::Both || s.stream == stream)
            .find_map(|s| s.find(re).map(|(a, b)| s.cite(a, b)))
    }

    /// The line that best explains a failure no pattern pinned down: the last line a built-in
    /// pattern matches, else the last informative error-looking line, else the last line.
    fn cause_line(&self) -> Option<CausalLine> {
        for b in BUILTIN.iter() {
            if let Some(re) = &b.regex
                && let Some(line) = self.find(re, LogStream::Both)
            {
                return Some(line);
            }
        }
        for s in &self.streams {
            if let Some(i) = s
                .lines
                .iter()
                .rposition(|l| ERRORISH.is_match(l) && !UNINFORMATIVE.is_match(l.trim()))
            {
                return Some(s.cite(i, i));
            }
        }
        for s in &self.streams {
            if let Some(i) = s.lines.iter().rposition(|l| !l.trim().is_empty()) {
                return Some(s.cite(i, i));
            }
        }
        None
    }
}

fn quote(line: &str) -> String {
    match line.char_indices().nth(QUOTED_CHARS) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line.to_string(),
    }
}

/// A built-in rule with its compiled pattern.
struct Builtin {
    rule: FailureRule,
    regex: Option<Regex>,
}

/// HTTP statuses a retry will not change.
const HTTP_PERMANENT: &str = r"40[0-5]|410|422";
/// HTTP statuses a retry may fix.
const HTTP_TRANSIENT: &str = r"5\d\d|429|408";

fn http(statuses: &str) -> String {
    // requests/urllib3 (`500 Server Error: … for url`, `429 Client Error`), httpx (`Server
    // error '503 Service Unavailable'`), urllib (`HTTP Error 503:`), curl (`The requested URL
    // returned error: 503`), wget (`ERROR 503: Service Unavailable.`), aiohttp (`503,
    // message='Service Unavailable'`), and plain `HTTP 503` / `HTTP/1.1 503`.
    format!(
        r"\b(?:{s}) (?:Server|Client) Error\b|\b(?:Server|Client) error '(?:{s})\b|\bHTTP Error (?:{s})\b|returned error:? (?:{s})\b|\bERROR (?:{s}):|\b(?:{s}), message=|\bHTTP(?:/\d(?:\.\d)?)? (?:{s})\b|\bstatus(?: code)?[ =:]+(?:{s})\b",
        s = statuses
    )
}

/// The built-in table. Order matters: the first rule that holds decides. Explicit signals from
/// the tool (a timeout, `EX_TEMPFAIL`) come first; then the final exception of a Python
/// traceback and other unambiguous permanent messages (so a retried-and-recovered network
/// hiccup earlier in the log does not hide a `KeyError`); then the transient families; then
/// generic permanent messages and exit codes.
static BUILTIN: LazyLock<Vec<Builtin>> = LazyLock::new(|| {
    use FailureClass::{Permanent, Transient};
    let exit = |name: &str, codes: &[i32], class| FailureRule {
        name: Some(name.into()),
        pattern: None,
        stream: LogStream::Both,
        case_sensitive: false,
        exit_codes: codes.to_vec(),
        signals: vec![],
        timed_out: None,
        class,
    };
    let pat = |name: &str, pattern: &str, class| FailureRule {
        name: Some(name.into()),
        pattern: Some(pattern.into()),
        ..exit(name, &[], class)
    };
    let rules = vec![
        FailureRule {
            timed_out: Some(true),
            ..exit("the attempt timed out", &[], Transient)
        },
        exit("exit code 75 (EX_TEMPFAIL)", &[75], Transient),
        exit("exit code 69 (EX_UNAVAILABLE)", &[69], Transient),
        exit("exit code 124 (timeout(1))", &[124], Transient),
        exit("exit code 137 (SIGKILL)", &[137], Transient),
        pat(
            "Python permanent exception",
            r"^\s*(?:[A-Za-z_]\w*\.)*(?:FileNotFoundError|KeyError|ValueError|PermissionError|ModuleNotFoundError|ImportError|TypeError|AttributeError|NameError|SyntaxError|IndentationError|IndexError|ZeroDivisionError|NotImplementedError|AssertionError|UnicodeDecodeError|UnicodeEncodeError|IsADirectoryError|NotADirectoryError|JSONDecodeError|ParserError|EmptyDataError|UndefinedTable|UndefinedColumn|InsufficientPrivilege|InvalidTextRepresentation)(?::|$)",
            Permanent,
        ),
        pat(
            "PostgreSQL permanent error",
            r#"password authentication failed|role "[^"]*" does not exist|database "[^"]*" does not exist|relation "[^"]*" does not exist|column "[^"]*" does not exist|syntax error at or near|permission denied for|no pg_hba\.conf entry|invalid input syntax for"#,
            Permanent,
        ),
        pat("HTTP 4xx (client error)", &http(HTTP_PERMANENT), Permanent),
        pat(
            "Python transient exception",
            r"^\s*(?:[A-Za-z_]\w*\.)*(?:ConnectionError|TimeoutError|ConnectionRefusedError|ConnectionResetError|ConnectionAbortedError|BrokenPipeError|timeout|ReadTimeout|ConnectTimeout|ReadTimeoutError|ConnectTimeoutError|ChunkedEncodingError|RemoteDisconnected|IncompleteRead|ProtocolError|NewConnectionError|MaxRetryError|ServerDisconnectedError|ClientConnectorError|RemoteProtocolError|ReadError|ConnectError|PoolTimeout|SerializationFailure|DeadlockDetected)(?::|$)",
            Transient,
        ),
        pat("HTTP 5xx, 429 or 408", &http(HTTP_TRANSIENT), Transient),
        pat(
            "HTTP server unavailable",
            r"\b50[0234] (?:Internal Server Error|Bad Gateway|Service Unavailable|Gateway Time-?out)\b|\b429 Too Many Requests\b|\b408 Request Time-?out\b|\bToo Many Requests\b|\brate limit(?:ed| exceeded)\b",
            Transient,
        ),
        pat(
            "HTTP client timeout or retries exhausted",
            r"\bRead timed out\b|\bMax retries exceeded\b|\bConnection timed out\b|\bOperation timed out\b|\btimed out\b|\bEmpty reply from server\b|\bRemote end closed connection\b|\bConnection aborted\b|\bIncompleteRead\b|\bFailed to establish a new connection\b|\bRecv failure\b",
            Transient,
        ),
        pat(
            "connection failure",
            r"\bConnection refused\b|\bConnection reset(?: by peer)?\b|\bNetwork is unreachable\b|\bNo route to host\b|\bBroken pipe\b|\bconnection closed\b|\bHost is unreachable\b",
            Transient,
        ),
        pat(
            "DNS failure",
            r"\bTemporary failure in name resolution\b|\bName or service not known\b|\bnodename nor servname provided\b|\bCould not resolve host\b|\bunable to resolve host address\b|\bgetaddrinfo failed\b|\bfailed to lookup address information\b|\bNo address associated with hostname\b",
            Transient,
        ),
        pat(
            "PostgreSQL unavailable",
            r"\bcould not connect to server\b|connection to server (?:at|on) .{0,200}? failed|\bis not currently accepting connections\b|\bthe database system is (?:starting up|shutting down|in recovery mode|not yet accepting connections)\b|\btoo many clients\b|\bremaining connection slots are reserved\b|\bdeadlock detected\b|\bserver closed the connection unexpectedly\b|\bcould not serialize access\b|\bterminating connection due to (?:administrator command|conflict with recovery|idle)|\bcanceling statement due to (?:conflict with recovery|statement timeout|lock timeout)\b|\bSSL SYSCALL error\b|\bcould not (?:receive|send) data (?:from|to) server\b",
            Transient,
        ),
        pat(
            "temporary condition",
            r"\btemporar(?:y|ily) (?:unavailable|failure|error)\b|\btry again(?: later)?\b|\bResource temporarily unavailable\b|\btoo many connections\b|\bservice unavailable\b",
            Transient,
        ),
        FailureRule {
            case_sensitive: true,
            ..pat("`CRITICAL` in the log", r"\bCRITICAL\b", Permanent)
        },
        pat(
            "permanent condition",
            r"\bpermission denied\b|\bno such file or directory\b|\bsyntax error\b|\binvalid argument\b|\bunrecognized (?:option|arguments?)\b|\bthe following arguments are required\b|\bcommand not found\b|not on this worker's allowlist",
            Permanent,
        ),
        exit(
            "usage, config or missing program (exit code 2, 64, 65, 66, 78, 126 or 127)",
            &[2, 64, 65, 66, 78, 126, 127],
            Permanent,
        ),
        FailureRule {
            signals: vec![1, 2, 3, 9, 15],
            ..exit(
                "killed by a signal (HUP, INT, QUIT, KILL or TERM)",
                &[],
                Transient,
            )
        },
    ];
    rules
        .into_iter()
        .map(|rule| Builtin {
            regex: rule
                .pattern
                .as_deref()
                .map(|p| compile(p, rule.case_sensitive).expect("built-in patterns are valid")),
            rule,
        })
        .collect()
});

#[cfg(test)]
mod tests {
    use super::*;

    fn log<'a>(exit_code: i32, stdout: &'a str, stderr: &'a str) -> AttemptLog<'a> {
        AttemptLog {
            exit_code,
            stdout,
            stderr,
            stdout_first_line: 1,
            stderr_first_line: 1,
            ..AttemptLog::default()
        }
    }

    fn builtin(l: &AttemptLog<'_>) -> FailureFact {
        classify(&FailuresConfig::default(), l)
    }

    #[test]
    fn requests_http_500_is_transient_and_cited() {
        let out = "Fetching publication page…\n❌ Failed: 500 Server Error: Internal Server Error for url: http://127.0.0.1:8000/pub\n❌ Error: 1\n";
        let f = builtin(&log(1, out, ""));
        assert_eq!(f.class, FailureClass::Transient, "{f:?}");
        let line = f.line.unwrap();
        assert_eq!(line.stream, LogStream::Stdout);
        assert_eq!(line.line, 2);
        assert!(line.text.contains("500 Server Error"), "{}", line.text);
    }

    #[test]
    fn http_families_in_each_tool_wording() {
        let transient = [
            "requests.exceptions.HTTPError: 503 Server Error: Service Unavailable for url: http://x/",
            "urllib3.exceptions.MaxRetryError: HTTPConnectionPool(host='x', port=80): Max retries exceeded with url: /a",
            "requests.exceptions.ReadTimeout: HTTPConnectionPool(host='x', port=80): Read timed out. (read timeout=5)",
            "httpx.HTTPStatusError: Server error '502 Bad Gateway' for url 'http://x/'",
            "httpx.HTTPStatusError: Client error '429 Too Many Requests' for url 'http://x/'",
            "curl: (22) The requested URL returned error: 503",
            "curl: (7) Failed to connect to x port 80 after 0 ms: Connection refused",
            "curl: (6) Could not resolve host: x.invalid",
            "2024-01-01 10:00:00 ERROR 504: Gateway Time-out.",
            "urllib.error.HTTPError: HTTP Error 500: Internal Server Error",
            "socket.gaierror: [Errno -3] Temporary failure in name resolution",
            "OSError: [Errno 104] Connection reset by peer",
            "ConnectionRefusedError: [Errno 111] Connection refused",
            "BrokenPipeError: [Errno 32] Broken pipe",
            "TimeoutError: timed out",
        ];
        for line in transient {
            let f = builtin(&log(1, "", line));
            assert_eq!(f.class, FailureClass::Transient, "{line}: {f:?}");
            assert_eq!(f.line.as_ref().unwrap().stream, LogStream::Stderr);
        }
        let permanent = [
            "requests.exceptions.HTTPError: 404 Client Error: Not Found for url: http://x/",
            "curl: (22) The requested URL returned error: 403",
            "FileNotFoundError: [Errno 2] No such file or directory: 'in.csv'",
            "KeyError: 'rows'",
            "ValueError: invalid literal for int() with base 10: 'x'",
            "PermissionError: [Errno 13] Permission denied: '/out'",
            "ModuleNotFoundError: No module named 'pandas'",
            "psycopg2.errors.UndefinedTable: relation \"staging.x\" does not exist",
        ];
        for line in permanent {
            let f = builtin(&log(1, "", line));
            assert_eq!(f.class, FailureClass::Permanent, "{line}: {f:?}");
        }
    }

    #[test]
    fn postgres_messages() {
        for (line, class) in [
            (
                "psycopg2.OperationalError: connection to server at \"127.0.0.1\", port 5432 failed: FATAL:  database \"dw\" is not currently accepting connections",
                FailureClass::Transient,
            ),
            (
                "psql: error: connection to server on socket \"/run/postgresql/.s.PGSQL.5432\" failed: No such file or directory",
                FailureClass::Transient,
            ),
            (
                "FATAL:  the database system is starting up",
                FailureClass::Transient,
            ),
            (
                "FATAL:  sorry, too many clients already",
                FailureClass::Transient,
            ),
            ("ERROR:  deadlock detected", FailureClass::Transient),
            (
                "server closed the connection unexpectedly",
                FailureClass::Transient,
            ),
            (
                "could not connect to server: Connection refused",
                FailureClass::Transient,
            ),
            (
                "psycopg2.OperationalError: connection to server at \"127.0.0.1\", port 5432 failed: FATAL:  password authentication failed for user \"x\"",
                FailureClass::Permanent,
            ),
            (
                "FATAL:  database \"nope\" does not exist",
                FailureClass::Permanent,
            ),
        ] {
            let f = builtin(&log(1, "", line));
            assert_eq!(f.class, class, "{line}: {f:?}");
        }
    }

    #[test]
    fn wrapped_and_coloured_messages_match() {
        // psycopg2's message wrapped at 80 columns by a console library, in colour.
        let err = "\x1b[31mpsycopg2.OperationalError: connection to server at \"127.0.0.1\", port 5499 failed: Connection\x1b[0m\n\x1b[31mrefused\x1b[0m\n\tIs the server running on that host and accepting TCP/IP connections?\n";
        let f = builtin(&log(1, "", err));
        assert_eq!(f.class, FailureClass::Transient, "{f:?}");
        let line = f.line.unwrap();
        assert_eq!(line.line, 1);
        assert!(!line.text.contains('\x1b'), "{}", line.text);
        assert!(
            line.text.contains("failed: Connection refused"),
            "{}",
            line.text
        );
    }

    #[test]
    fn traceback_last_line_decides_over_earlier_noise() {
        let err = "WARNING: Retrying (Retry(total=2)) after connection broken by 'ReadTimeoutError(\"Read timed out.\")'\nTraceback (most recent call last):\n  File \"t.py\", line 3, in <module>\n    rows = doc['rows']\nKeyError: 'rows'\n";
        let f = builtin(&log(1, "", err));
        assert_eq!(f.class, FailureClass::Permanent, "{f:?}");
        let line = f.line.unwrap();
        assert_eq!(line.line, 5);
        assert_eq!(line.text, "KeyError: 'rows'");
    }

    #[test]
    fn exit_codes_and_timeouts() {
        for code in [75, 69, 124, 137] {
            assert_eq!(builtin(&log(code, "", "")).class, FailureClass::Transient);
        }
        for code in [2, 64, 126, 127] {
            assert_eq!(builtin(&log(code, "", "")).class, FailureClass::Permanent);
        }
        let timed = AttemptLog {
            timed_out: true,
            exit_code: 143,
            signal: Some(15),
            ..AttemptLog::default()
        };
        let f = builtin(&timed);
        assert_eq!(f.class, FailureClass::Transient);
        assert_eq!(f.rule, "built-in: the attempt timed out");
    }

    #[test]
    fn unclassified_cites_the_informative_line_not_the_last() {
        let out = "loading\nupload failed: bucket quota reached for project 7\n❌ Error: 1\n";
        let err = "FutureWarning: the default of observed=False is deprecated\n";
        let f = builtin(&log(3, out, err));
        assert_eq!(f.class, FailureClass::Unclassified, "{f:?}");
        let line = f.line.unwrap();
        assert_eq!(line.stream, LogStream::Stdout);
        assert_eq!(line.line, 2);
        assert!(line.text.contains("bucket quota"), "{}", line.text);
    }

    #[test]
    fn user_rules_come_first_and_can_drop_the_builtin_table() {
        let cfg = FailuresConfig {
            rules: vec![FailureRule {
                name: Some("quota".into()),
                pattern: Some("quota reached".into()),
                stream: LogStream::Both,
                case_sensitive: false,
                exit_codes: vec![],
                signals: vec![],
                timed_out: None,
                class: FailureClass::Transient,
            }],
            builtin: Some(false),
        };
        let f = classify(&cfg, &log(1, "Quota Reached\n", ""));
        assert_eq!(f.class, FailureClass::Transient);
        assert_eq!(f.rule, "quota");
        // Without the table, exit 75 is not known.
        assert_eq!(
            classify(&cfg, &log(75, "", "")).class,
            FailureClass::Unclassified
        );
        // A user rule overrides the table: treat 500s as permanent.
        let cfg = FailuresConfig {
            rules: vec![FailureRule {
                pattern: Some("500 Server Error".into()),
                class: FailureClass::Permanent,
                ..cfg.rules[0].clone()
            }],
            builtin: None,
        };
        let f = classify(&cfg, &log(1, "500 Server Error: x", ""));
        assert_eq!(f.class, FailureClass::Permanent);
    }

    #[test]
    fn conditions_combine() {
        let rule = FailureRule {
            name: None,
            pattern: Some("disk".into()),
            stream: LogStream::Stdout,
            case_sensitive: false,
            exit_codes: vec![3],
            signals: vec![],
            timed_out: None,
            class: FailureClass::Escalate,
        };
        let cfg = FailuresConfig {
            rules: vec![rule],
            builtin: Some(false),
        };
        assert_eq!(
            classify(&cfg, &log(3, "disk full", "")).class,
            FailureClass::Escalate
        );
        assert_eq!(
            classify(&cfg, &log(4, "disk full", "")).class,
            FailureClass::Unclassified
        );
        assert_eq!(
            classify(&cfg, &log(3, "", "disk full")).class,
            FailureClass::Unclassified
        );
        let f = classify(&cfg, &log(3, "disk full", ""));
        assert_eq!(f.rule, "rule 1 (pattern `disk`, exit codes 3)");
    }

    #[test]
    fn config_check_refuses_empty_and_invalid_rules() {
        let mut cfg: FailuresConfig =
            serde_json::from_str(r#"{"rules": [{"class": "transient"}]}"#).unwrap();
        assert_eq!(cfg.check().unwrap_err().0, "rules[0]");
        cfg = serde_json::from_str(r#"{"rules": [{"pattern": "(x", "class": "permanent"}]}"#)
            .unwrap();
        assert_eq!(cfg.check().unwrap_err().0, "rules[0].pattern");
        cfg = serde_json::from_str(r#"{"rules": [{"exit_codes": [1], "class": "unclassified"}]}"#)
            .unwrap();
        assert_eq!(cfg.check().unwrap_err().0, "rules[0].class");
        assert!(
            serde_json::from_str::<FailuresConfig>(
                r#"{"rules": [{"exit_code": 1, "class": "permanent"}]}"#
            )
            .is_err()
        );
    }

    #[test]
    fn tail_splits_into_streams() {
        let tail = "[... 10 bytes of stdout omitted ...]\nout 1\nout 2\n[--- stderr ---]\nerr 1\n";
        let l = AttemptLog::from_tail(tail, 1, None, false);
        assert_eq!(l.stdout, "out 1\nout 2");
        assert_eq!(l.stderr, "err 1\n");
        let only_err = AttemptLog::from_tail("[--- stderr ---]\nboom\n", 1, None, false);
        assert_eq!(only_err.stdout, "");
        assert_eq!(only_err.stderr, "boom\n");
    }

    #[test]
    fn the_docs_list_the_builtin_table_in_order() {
        let doc = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/FAILURES.md"),
        )
        .unwrap();
        for (i, r) in builtin_rules().iter().enumerate() {
            let name = r.name.as_deref().unwrap();
            let short = name.split(" (exit code 2").next().unwrap();
            let short = short.split(" (HUP").next().unwrap();
            let row = format!("| {} | {short} | {} |", i + 1, r.class);
            assert!(doc.contains(&row), "docs/FAILURES.md lacks `{row}`");
        }
        let next = format!("| {} | ", builtin_rules().len() + 1);
        assert!(!doc.contains(&next), "docs/FAILURES.md lists more rules");
    }

    #[test]
    fn layering_puts_the_step_first() {
        let r = |p: &str| FailureRule {
            name: None,
            pattern: Some(p.into()),
            stream: LogStream::Both,
            case_sensitive: false,
            exit_codes: vec![],
            signals: vec![],
            timed_out: None,
            class: FailureClass::Permanent,
        };
        let pipeline = FailuresConfig {
            rules: vec![r("p")],
            builtin: Some(false),
        };
        let step = FailuresConfig {
            rules: vec![r("s")],
            builtin: None,
        };
        let l = FailuresConfig::layered(Some(&step), &pipeline);
        assert_eq!(l.rules, vec![r("s"), r("p")]);
        assert_eq!(l.builtin, Some(false));
        assert_eq!(
            FailuresConfig::layered(None, &FailuresConfig::default()).builtin,
            Some(true)
        );
    }
}
