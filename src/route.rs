//! Route stage: Fluentd match patterns, compiled once per core, and the tag → route
//! lookup with a per-core cache.
//!
//! Patterns follow Fluentd's `GlobMatchPattern` token for token: `*` is `[^.]*`, `**` is
//! `.*`, `a.**` also matches `a` (the dot before `**` becomes "followed by a dot or the
//! end"), `**.b` also matches `b`, `{x,y}` gives alternatives, `\` escapes, and a route may
//! list several patterns separated by spaces. Matching runs over sets of positions in the
//! tag, so it is linear in the tag for each token and never backtracks.

use std::collections::HashMap;

use crate::limits::ROUTE_CACHE_TAGS;

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Lit(u8),
    /// `[^.]*`
    Star,
    /// `.*`
    AnyStar,
    /// `(?:.*\.|\A)`: any prefix ending in a dot, or nothing at the start of the tag.
    AnyDotOrStart,
    /// `(?![^.])`: at the end of the tag or before a dot.
    PartEnd,
    /// `{a,b}`
    Alt(Vec<Vec<Tok>>),
}

/// One compiled match pattern.
#[derive(Clone, Debug)]
pub struct Pattern {
    source: String,
    toks: Vec<Tok>,
}

impl Pattern {
    pub fn new(pat: &str) -> Pattern {
        let b = pat.as_bytes();
        // Sequences being built: the outermost, then one per open `{` alternative.
        let mut seqs: Vec<Vec<Tok>> = vec![vec![]];
        // Finished alternatives of each open `{`.
        let mut alts: Vec<Vec<Vec<Tok>>> = vec![];
        let (mut escape, mut dot) = (false, false);
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            let cur = seqs.last_mut().expect("the outer sequence is never popped");
            if escape {
                cur.push(Tok::Lit(c));
                escape = false;
                i += 1;
                continue;
            }
            if b[i..].starts_with(b"**") {
                if dot {
                    cur.push(Tok::PartEnd);
                    dot = false;
                }
                if b.get(i + 2) == Some(&b'.') {
                    cur.push(Tok::AnyDotOrStart);
                    i += 3;
                } else {
                    cur.push(Tok::AnyStar);
                    i += 2;
                }
                continue;
            }
            if dot {
                cur.push(Tok::Lit(b'.'));
                dot = false;
            }
            match c {
                b'\\' => escape = true,
                b'.' => dot = true,
                b'*' => cur.push(Tok::Star),
                b'{' => {
                    alts.push(vec![]);
                    seqs.push(vec![]);
                }
                b'}' if !alts.is_empty() => {
                    let mut done = alts.pop().unwrap_or_default();
                    done.push(seqs.pop().unwrap_or_default());
                    seqs.last_mut().expect("outer").push(Tok::Alt(done));
                }
                b',' if !alts.is_empty() => {
                    let seq = seqs.pop().unwrap_or_default();
                    alts.last_mut().expect("open brace").push(seq);
                    seqs.push(vec![]);
                }
                _ => cur.push(Tok::Lit(c)),
            }
            i += 1;
        }
        // Fluentd closes braces left open at the end.
        while let Some(mut done) = alts.pop() {
            done.push(seqs.pop().unwrap_or_default());
            seqs.last_mut().expect("outer").push(Tok::Alt(done));
        }
        Pattern {
            source: pat.to_string(),
            toks: seqs.pop().unwrap_or_default(),
        }
    }

    /// Refuses what would compile to something the writer did not mean: a `{` left open
    /// (Fluentd closes it silently at the end), or a `}` with no `{`.
    pub fn check(pat: &str) -> Result<(), String> {
        let (mut depth, mut escape) = (0usize, false);
        for c in pat.bytes() {
            match c {
                _ if escape => escape = false,
                b'\\' => escape = true,
                b'{' => depth += 1,
                b'}' if depth == 0 => {
                    return Err(format!(
                        "pattern {pat:?} has a `}}` with no `{{` (escape it as `\\}}`)"
                    ));
                }
                b'}' => depth -= 1,
                _ => {}
            }
        }
        match depth {
            0 => Ok(()),
            _ => Err(format!("pattern {pat:?} leaves a `{{` unclosed")),
        }
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn matches(&self, tag: &str) -> bool {
        let s = tag.as_bytes();
        let mut start = vec![false; s.len() + 1];
        start[0] = true;
        run(&self.toks, s, start)[s.len()]
    }
}

/// Advances a set of positions (`at[q]`: the pattern so far can end at byte q) over `toks`.
fn run(toks: &[Tok], s: &[u8], mut at: Vec<bool>) -> Vec<bool> {
    let n = s.len();
    for tok in toks {
        let mut next = vec![false; n + 1];
        match tok {
            Tok::Lit(c) => {
                for q in 0..n {
                    next[q + 1] = at[q] && s[q] == *c;
                }
            }
            Tok::Star => {
                next[0] = at[0];
                for q in 1..=n {
                    next[q] = at[q] || (next[q - 1] && s[q - 1] != b'.');
                }
            }
            Tok::AnyStar => {
                next[0] = at[0];
                for q in 1..=n {
                    next[q] = at[q] || next[q - 1];
                }
            }
            Tok::AnyDotOrStart => {
                next[0] = at[0];
                let mut seen = false;
                for q in 1..=n {
                    seen |= at[q - 1];
                    next[q] = seen && s[q - 1] == b'.';
                }
            }
            Tok::PartEnd => {
                for q in 0..=n {
                    next[q] = at[q] && (q == n || s[q] == b'.');
                }
            }
            Tok::Alt(branches) => {
                for b in branches {
                    let reach = run(b, s, at.clone());
                    for (x, r) in next.iter_mut().zip(reach) {
                        *x |= r;
                    }
                }
            }
        }
        at = next;
    }
    at
}

/// Tags longer than this are matched every time rather than cached.
const MAX_CACHED_TAG: usize = 256;

/// Maps tags to the first route whose patterns match, for one core.
pub struct Router {
    routes: Vec<Vec<Pattern>>,
    cache: HashMap<Box<str>, Option<usize>>,
    last_tag: String,
    last: Option<Option<usize>>,
}

impl Router {
    /// `routes[i]` lists the patterns of route `i`, in the config's order.
    pub fn new(routes: Vec<Vec<Pattern>>) -> Self {
        Router {
            routes,
            cache: HashMap::new(),
            last_tag: String::new(),
            last: None,
        }
    }

    /// The router of a config's routes.
    pub fn of(routes: &[crate::config::Route]) -> Self {
        Router::new(
            routes
                .iter()
                .map(|r| r.patterns.iter().map(|p| Pattern::new(p)).collect())
                .collect(),
        )
    }

    /// The index of the route for `tag`, if any matches.
    #[inline]
    pub fn route(&mut self, tag: &str) -> Option<usize> {
        // Consecutive events from one container share their tag.
        if let Some(r) = self.last
            && self.last_tag == tag
        {
            return r;
        }
        let r = match self.cache.get(tag) {
            Some(r) => *r,
            None => {
                let r = self
                    .routes
                    .iter()
                    .position(|ps| ps.iter().any(|p| p.matches(tag)));
                if tag.len() <= MAX_CACHED_TAG {
                    if self.cache.len() >= ROUTE_CACHE_TAGS {
                        self.cache.clear();
                    }
                    self.cache.insert(tag.into(), r);
                }
                r
            }
        };
        if tag.len() <= MAX_CACHED_TAG {
            self.last_tag.clear();
            self.last_tag.push_str(tag);
            self.last = Some(r);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unbalanced_braces_are_refused() {
        assert!(Pattern::check("a.{b,c}").is_ok());
        assert!(Pattern::check("a.\\{b").is_ok());
        assert!(Pattern::check("a.{b,c").unwrap_err().contains("unclosed"));
        assert!(Pattern::check("a.b}").unwrap_err().contains("no `{`"));
    }

    fn m(p: &str, tag: &str) -> bool {
        Pattern::new(p).matches(tag)
    }

    // Cases from Fluentd's test/test_match.rb.
    #[test]
    fn fluentd_glob_semantics() {
        assert!(m("a", "a"));
        assert!(!m("a", "b"));
        assert!(!m("a", "a.b"));
        assert!(m("a.b", "a.b"));
        assert!(m("a.*", "a.b"));
        assert!(!m("a.*", "a.b.c"));
        assert!(!m("a.*", "a"));
        assert!(m("a.*.c", "a.b.c"));
        assert!(m("*", "a"));
        assert!(!m("*", "a.b"));
        assert!(m("a*", "abc"));
        assert!(m("**", "a"));
        assert!(m("**", "a.b.c"));
        assert!(m("**", ""));
        assert!(m("a.**", "a"));
        assert!(m("a.**", "a.b"));
        assert!(m("a.**", "a.b.c"));
        assert!(!m("a.**", "ab"));
        assert!(!m("a.**", "ab.c"));
        assert!(m("**.b", "b"));
        assert!(m("**.b", "a.b"));
        assert!(m("**.b", "a.x.b"));
        assert!(!m("**.b", "ab"));
        assert!(m("a.**.c", "a.c"));
        assert!(m("a.**.c", "a.b.c"));
        assert!(m("a.**.c", "a.b.x.c"));
        assert!(!m("a.**.c", "a.bc"));
        assert!(m("{a,b}", "a"));
        assert!(m("{a,b}", "b"));
        assert!(!m("{a,b}", "c"));
        assert!(m("a.{b,c}", "a.c"));
        assert!(m("{a,b}.**", "b.x.y"));
        assert!(m("{a.*,b}", "a.x"));
        assert!(m("{a.**,b}.x", "a.y.x"));
        assert!(m("a\\*", "a*"));
        assert!(!m("a\\*", "ab"));
        // An unclosed brace is closed at the end, as Fluentd does.
        assert!(m("{a,b", "b"));
    }

    #[test]
    fn first_matching_route_wins_and_is_cached() {
        let routes = vec![
            vec![Pattern::new("frontend*"), Pattern::new("web.**")],
            vec![Pattern::new("**")],
        ];
        let mut r = Router::new(routes);
        assert_eq!(r.route("frontend-1"), Some(0));
        assert_eq!(r.route("web.a.b"), Some(0));
        assert_eq!(r.route("backend"), Some(1));
        assert_eq!(r.route("backend"), Some(1));
        let mut none = Router::new(vec![vec![Pattern::new("a")]]);
        assert_eq!(none.route("b"), None);
        assert_eq!(none.route("b"), None);
    }
}
