//! The `filter` of a Compute `list`, as the real API reads it:
//! - `field = "value"` / `field != "value"`: exact comparison;
//! - `field eq "regex"` / `field ne "regex"`: an RE2 regular expression that must match the
//!   whole field (quotes optional, single or double);
//! - one expression alone, or several in parentheses, all of which must hold.
//!
//! Compute refuses a filter that mixes the two operator families, and so does this server;
//! anything it cannot read is a 400 `Invalid list filter expression`. Of RE2 the server
//! knows literals, `\` escapes, `.` and `.*`, and refuses any other metacharacter loudly
//! (a 400), so that a client relying on more fails here rather than passing unchecked.

use serde_json::Value;

#[derive(Debug, Clone)]
pub(super) enum Test {
    Equals(String),
    Matches(Pattern),
}

#[derive(Debug, Clone)]
pub(super) struct Expr {
    pub field: String,
    /// `=` / `eq` (true) or `!=` / `ne` (false).
    pub positive: bool,
    pub test: Test,
}

impl PartialEq for Expr {
    fn eq(&self, other: &Self) -> bool {
        let text = |t: &Test| match t {
            Test::Equals(v) => ("=", v.clone()),
            Test::Matches(r) => ("eq", r.source.clone()),
        };
        self.field == other.field
            && self.positive == other.positive
            && text(&self.test) == text(&other.test)
    }
}

fn unquote(v: &str) -> &str {
    let v = v.trim();
    for q in ['"', '\''] {
        if let Some(inner) = v.strip_prefix(q).and_then(|v| v.strip_suffix(q)) {
            return inner;
        }
    }
    v
}

fn parse_one(e: &str) -> Option<Expr> {
    let e = e.trim();
    // `field eq literal` / `field ne literal`: a regular expression.
    let words: Vec<&str> = e.splitn(3, char::is_whitespace).collect();
    if let [field, op @ ("eq" | "ne"), value] = words.as_slice() {
        let re = Pattern::new(unquote(value))?;
        return Some(Expr {
            field: field.to_string(),
            positive: *op == "eq",
            test: Test::Matches(re),
        });
    }
    let (field, positive, value) = if let Some((a, b)) = e.split_once("!=") {
        (a, false, b)
    } else {
        let (a, b) = e.split_once('=')?;
        (a, true, b)
    };
    let field = field.trim();
    if field.is_empty() || field.contains(' ') {
        return None;
    }
    Some(Expr {
        field: field.to_string(),
        positive,
        test: Test::Equals(unquote(value).to_string()),
    })
}

/// A regular expression of literals, `.` and `.*`, matched against a whole field.
#[derive(Debug, Clone)]
pub(super) struct Pattern {
    source: String,
    tokens: Vec<Token>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Char(char),
    Any,
    AnyRun,
}

impl Pattern {
    fn new(source: &str) -> Option<Pattern> {
        let mut tokens = Vec::new();
        let mut chars = source.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' => tokens.push(Token::Char(chars.next()?)),
                '.' if chars.peek() == Some(&'*') => {
                    chars.next();
                    tokens.push(Token::AnyRun);
                }
                '.' => tokens.push(Token::Any),
                '*' | '+' | '?' | '(' | ')' | '[' | ']' | '{' | '}' | '|' | '^' | '$' => {
                    return None;
                }
                c => tokens.push(Token::Char(c)),
            }
        }
        Some(Pattern {
            source: source.to_string(),
            tokens,
        })
    }

    fn matches_whole(&self, s: &str) -> bool {
        fn go(t: &[Token], s: &[char]) -> bool {
            match t.split_first() {
                None => s.is_empty(),
                Some((Token::AnyRun, rest)) => (0..=s.len()).any(|i| go(rest, &s[i..])),
                Some((Token::Any, rest)) => !s.is_empty() && go(rest, &s[1..]),
                Some((Token::Char(c), rest)) => s.first() == Some(c) && go(rest, &s[1..]),
            }
        }
        let chars: Vec<char> = s.chars().collect();
        go(&self.tokens, &chars)
    }
}

/// The expressions of a filter, all of which must hold; `None` when it is not one Compute
/// accepts.
pub(super) fn parse(filter: &str) -> Option<Vec<Expr>> {
    let f = filter.trim();
    if f.is_empty() {
        return Some(Vec::new());
    }
    let exprs: Vec<&str> = if f.starts_with('(') {
        f.split(')')
            .map(|p| p.trim().trim_start_matches("AND").trim())
            .filter(|p| !p.is_empty())
            .map(|p| p.strip_prefix('('))
            .collect::<Option<Vec<&str>>>()?
    } else {
        vec![f]
    };
    let out: Vec<Expr> = exprs.into_iter().map(parse_one).collect::<Option<_>>()?;
    let regexes = out
        .iter()
        .filter(|e| matches!(e.test, Test::Matches(_)))
        .count();
    if regexes != 0 && regexes != out.len() {
        return None;
    }
    Some(out)
}

/// Whether a resource passes every expression.
pub(super) fn passes(filter: &[Expr], resource: &Value) -> bool {
    filter.iter().all(|e| {
        let actual = match &resource[e.field.as_str()] {
            Value::String(v) => v.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        };
        let hit = match &e.test {
            Test::Equals(v) => actual == *v,
            Test::Matches(re) => re.matches_whole(&actual),
        };
        hit == e.positive
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn eq(field: &str, positive: bool, value: &str) -> Expr {
        Expr {
            field: field.into(),
            positive,
            test: Test::Equals(value.into()),
        }
    }

    #[test]
    fn filters_parse_and_match_like_compute() {
        assert_eq!(
            parse(r#"network = "https://x/n""#),
            Some(vec![eq("network", true, "https://x/n")])
        );
        assert_eq!(
            parse(r#"(name != "a") (network = "b")"#),
            Some(vec![eq("name", false, "a"), eq("network", true, "b")])
        );
        assert_eq!(parse(""), Some(vec![]));
        assert_eq!(parse("nonsense"), None);
        assert_eq!(parse("(name = a) nonsense"), None);
        // Mixing `=` and `eq` is refused, as Compute does.
        assert_eq!(parse(r#"(name eq "npf-.*") (network = "b")"#), None);
        let prefix = parse(r#"name eq "npf-c1-.*""#).unwrap();
        let rule = |name: &str| json!({"name": name});
        assert!(passes(&prefix, &rule("npf-c1-web-0123")));
        // The whole field must match.
        assert!(!passes(&prefix, &rule("x-npf-c1-web")));
        assert!(!passes(&prefix, &rule("npf-c2-web")));
        let single = parse("name eq 'npf-c1-.*'").unwrap();
        assert!(passes(&single, &rule("npf-c1-a")));
        let not = parse("name ne npf-.*").unwrap();
        assert!(passes(&not, &rule("allow-ssh")));
        assert!(!passes(&not, &rule("npf-c1-a")));
        assert_eq!(parse(r#"name eq "(""#), None, "a bad regex is a 400");
        assert_eq!(
            parse(r#"name eq "a|b""#),
            None,
            "unsupported RE2 is refused loudly"
        );
        let dots = parse(r#"name eq "npf-c\.1-.""#).unwrap();
        assert!(passes(&dots, &rule("npf-c.1-x")));
        assert!(!passes(&dots, &rule("npf-cx1-x")));
    }
}
