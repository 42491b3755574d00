//! Canonical S-expressions, the subset libgcrypt prints and Guix stores its keys and
//! signatures in (SPKI's format, <http://people.csail.mit.edu/rivest/Sexp.txt>): lists,
//! tokens, `#hex#`, `"quoted strings"` and verbatim `N:bytes`. Read by [`super::guix`];
//! parsing is bounded in depth and never panics.

use super::guix::GuixError;

/// An S-expression: an octet string or a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sexp {
    Atom(Vec<u8>),
    List(Vec<Sexp>),
}

/// Deepest nesting accepted (Guix's signatures nest 4 deep).
const MAX_DEPTH: usize = 16;

impl Sexp {
    /// Parse the textual forms libgcrypt reads: lists, tokens, `#hex#`, `"strings"` and
    /// verbatim `N:bytes`. One expression, surrounded by white space at most.
    pub fn parse(text: &[u8]) -> Result<Sexp, GuixError> {
        let mut p = Parser { s: text, i: 0 };
        let e = p.expr(0)?;
        p.ws();
        if p.i != text.len() {
            return Err(GuixError::Sexp(format!("trailing bytes at offset {}", p.i)));
        }
        Ok(e)
    }

    pub(crate) fn atom(&self) -> Option<&[u8]> {
        match self {
            Sexp::Atom(a) => Some(a),
            Sexp::List(_) => None,
        }
    }

    /// The first list, depth first, whose head is `token` (libgcrypt's `find_token`).
    pub fn find(&self, token: &str) -> Option<&[Sexp]> {
        let Sexp::List(items) = self else {
            return None;
        };
        if items.first().and_then(Sexp::atom) == Some(token.as_bytes()) {
            return Some(items);
        }
        items.iter().find_map(|i| i.find(token))
    }

    /// The atom after `token` in the list headed by `token` (`(q #..#)` → the bytes).
    pub(crate) fn value(&self, token: &str) -> Option<&[u8]> {
        self.find(token)?.get(1)?.atom()
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn err(&self, what: &str) -> GuixError {
        GuixError::Sexp(format!("{what} at offset {}", self.i))
    }

    fn expr(&mut self, depth: usize) -> Result<Sexp, GuixError> {
        self.ws();
        let Some(&c) = self.s.get(self.i) else {
            return Err(self.err("unexpected end"));
        };
        match c {
            b'(' => {
                if depth >= MAX_DEPTH {
                    return Err(self.err("nested too deep"));
                }
                self.i += 1;
                let mut items = Vec::new();
                loop {
                    self.ws();
                    match self.s.get(self.i) {
                        None => return Err(self.err("unclosed list")),
                        Some(b')') => {
                            self.i += 1;
                            return Ok(Sexp::List(items));
                        }
                        Some(_) => items.push(self.expr(depth + 1)?),
                    }
                }
            }
            b'#' => {
                let start = self.i + 1;
                let end = self.s[start..]
                    .iter()
                    .position(|&b| b == b'#')
                    .map(|p| start + p)
                    .ok_or_else(|| self.err("unclosed #hex#"))?;
                let hex: Vec<u8> = self.s[start..end]
                    .iter()
                    .copied()
                    .filter(|b| !b.is_ascii_whitespace())
                    .collect();
                self.i = end + 1;
                unhex(&hex)
                    .map(Sexp::Atom)
                    .ok_or_else(|| self.err("bad hex"))
            }
            b'"' => {
                self.i += 1;
                let mut out = Vec::new();
                loop {
                    match self.s.get(self.i) {
                        None => return Err(self.err("unclosed string")),
                        Some(b'"') => {
                            self.i += 1;
                            return Ok(Sexp::Atom(out));
                        }
                        Some(b'\\') => {
                            let e = *self
                                .s
                                .get(self.i + 1)
                                .ok_or_else(|| self.err("bad escape"))?;
                            out.push(match e {
                                b'n' => b'\n',
                                b't' => b'\t',
                                b'r' => b'\r',
                                other => other,
                            });
                            self.i += 2;
                        }
                        Some(&b) => {
                            out.push(b);
                            self.i += 1;
                        }
                    }
                }
            }
            b'0'..=b'9' => {
                let start = self.i;
                while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
                    self.i += 1;
                }
                if self.s.get(self.i) != Some(&b':') {
                    return Err(self.err("a number that is not a verbatim length"));
                }
                let n: usize = std::str::from_utf8(&self.s[start..self.i])
                    .ok()
                    .and_then(|d| d.parse().ok())
                    .ok_or_else(|| self.err("bad length"))?;
                self.i += 1;
                let end = self.i.checked_add(n).filter(|&e| e <= self.s.len());
                let end = end.ok_or_else(|| self.err("verbatim string past the end"))?;
                let v = self.s[self.i..end].to_vec();
                self.i = end;
                Ok(Sexp::Atom(v))
            }
            _ => {
                let start = self.i;
                while self.i < self.s.len()
                    && (self.s[self.i].is_ascii_alphanumeric()
                        || b"-./_:*+=".contains(&self.s[self.i]))
                {
                    self.i += 1;
                }
                if self.i == start {
                    return Err(self.err(&format!("unexpected byte {:?}", c as char)));
                }
                Ok(Sexp::Atom(self.s[start..self.i].to_vec()))
            }
        }
    }
}

pub(crate) fn unhex(h: &[u8]) -> Option<Vec<u8>> {
    if h.len() % 2 != 0 {
        return None;
    }
    h.chunks(2)
        .map(|p| {
            let s = std::str::from_utf8(p).ok()?;
            u8::from_str_radix(s, 16).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sexp_parser_reads_every_form_and_refuses_garbage() {
        let s = Sexp::parse(b" (a \"b c\" #0A0b# 3:x y (d)) ").unwrap();
        assert_eq!(
            s,
            Sexp::List(vec![
                Sexp::Atom(b"a".to_vec()),
                Sexp::Atom(b"b c".to_vec()),
                Sexp::Atom(vec![0x0a, 0x0b]),
                Sexp::Atom(b"x y".to_vec()),
                Sexp::List(vec![Sexp::Atom(b"d".to_vec())]),
            ])
        );
        for bad in [&b"(a"[..], b"(a))", b"#0#", b"99:x", b"(\x01)", b""] {
            assert!(Sexp::parse(bad).is_err(), "{bad:?}");
        }
        let deep = format!("{}{}", "(".repeat(100), ")".repeat(100));
        assert!(Sexp::parse(deep.as_bytes()).is_err());
    }
}
