//! The `.drv` ATerm parser. The grammar is fixed
//! (`Derive([outputs],[inputDrvs],[inputSrcs],"system","builder",[args],[env])`), so the parser
//! is a straight-line reader with no recursion at all: nesting is at most three levels deep by
//! construction, and anything else is an error at the first byte that does not fit. Memory is
//! bounded by the input: every string is copied at most once into the result.
//!
//! Every error names the byte offset and what was expected there. Where Nix 2.8's parser
//! (`parseDerivation` in `src/libstore/derivations.cc`) accepts something odd, Kiln either
//! matches it (unknown escapes keep the escaped byte, strings may hold raw control bytes, lists
//! may be in any order) or refuses it with a clear message (duplicate keys, missing or leading
//! commas, trailing data); `docs/derivations.md` lists each case.

use std::collections::HashSet;
use std::fmt;

use thiserror::Error;

use super::output::{OutputError, OutputField};
use super::{Derivation, DerivationOutput};

/// A `.drv` file that is not a valid derivation. `offset` is the byte at which the problem was
/// found (for a truncated file, its length).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("at byte {offset}: {kind}")]
pub struct ParseError {
    pub offset: usize,
    pub kind: ParseErrorKind,
}

/// What went wrong, without the offset.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParseErrorKind {
    /// The byte at the offset does not fit the grammar.
    #[error("expected {expected}, found {found}")]
    Expected { expected: String, found: Found },
    /// A string is not closed before the end of the input.
    #[error("expected '\"' closing the {what} that starts at byte {start}, found end of input")]
    UnterminatedString { what: &'static str, start: usize },
    /// An output's strings do not form a valid output.
    #[error("invalid output {name:?}: {error}")]
    Output { name: String, error: OutputError },
    /// A path that must be absolute is not.
    #[error("{what} {path:?} is not an absolute path")]
    RelativePath { what: &'static str, path: String },
    /// The same key twice in a map. Nix 2.8 silently keeps one of them (the first output, the
    /// last input derivation or environment variable); Kiln refuses.
    #[error("duplicate {what} {key:?} (Nix would silently drop one of them; Kiln refuses)")]
    Duplicate { what: &'static str, key: String },
}

/// The byte found where something else was expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    EndOfInput,
    Byte(u8),
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Found::EndOfInput => f.write_str("end of input"),
            Found::Byte(b) if b.is_ascii_graphic() || *b == b' ' => write!(f, "'{}'", *b as char),
            Found::Byte(b) => write!(f, "byte 0x{b:02x}"),
        }
    }
}

/// `b` for an error message: lossy UTF-8, cut short if long (a key can be megabytes).
fn lossy(b: &[u8]) -> String {
    const MAX: usize = 120;
    if b.len() <= MAX {
        return String::from_utf8_lossy(b).into_owned();
    }
    format!(
        "{}… ({} bytes)",
        String::from_utf8_lossy(&b[..MAX]),
        b.len()
    )
}

/// Duplicate detection that costs one comparison per key while keys arrive sorted (as in
/// every file Nix writes), and falls back to a hash set from the first out-of-order key on.
#[derive(Default)]
struct Keys {
    set: Option<HashSet<Vec<u8>>>,
}

impl Keys {
    /// Whether `key` is new. `earlier` yields every key seen so far, `last` is the latest.
    fn is_new<'k, I>(
        &mut self,
        last: Option<&[u8]>,
        earlier: impl FnOnce() -> I,
        key: &[u8],
    ) -> bool
    where
        I: Iterator<Item = &'k [u8]>,
    {
        if let Some(set) = &mut self.set {
            return set.insert(key.to_vec());
        }
        match last {
            None => true,
            Some(l) if l < key => true,
            Some(_) => {
                let mut set: HashSet<Vec<u8>> = earlier().map(<[u8]>::to_vec).collect();
                let new = set.insert(key.to_vec());
                self.set = Some(set);
                new
            }
        }
    }
}

struct Parser<'a> {
    input: &'a [u8],
    pos: usize,
}

/// Outcome of reading the separator after a list element.
enum Next {
    More,
    End,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Found {
        match self.input.get(self.pos) {
            Some(&b) => Found::Byte(b),
            None => Found::EndOfInput,
        }
    }

    fn error(&self, offset: usize, kind: ParseErrorKind) -> ParseError {
        ParseError { offset, kind }
    }

    fn expected(&self, expected: impl Into<String>) -> ParseError {
        self.error(
            self.pos,
            ParseErrorKind::Expected {
                expected: expected.into(),
                found: self.peek(),
            },
        )
    }

    /// Consume `byte` or fail with "expected '<byte>' <context>".
    fn byte(&mut self, byte: u8, context: &str) -> Result<(), ParseError> {
        if self.input.get(self.pos) == Some(&byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.expected(format!("'{}' {context}", byte as char)))
        }
    }

    /// Consume the literal `lit`, pointing at the first byte that differs.
    fn literal(&mut self, lit: &[u8], context: &str) -> Result<(), ParseError> {
        for (i, &b) in lit.iter().enumerate() {
            if self.input.get(self.pos) != Some(&b) {
                let context = if i == 0 {
                    context.to_string()
                } else {
                    format!("after {:?}", String::from_utf8_lossy(&lit[..i]))
                };
                return Err(self.expected(format!("'{}' {context}", b as char)));
            }
            self.pos += 1;
        }
        Ok(())
    }

    /// Start a list: `[`, then whether it is empty (`]` consumed).
    fn list_start(&mut self, context: &str) -> Result<bool, ParseError> {
        self.byte(b'[', context)?;
        if self.input.get(self.pos) == Some(&b']') {
            self.pos += 1;
            return Ok(true);
        }
        Ok(false)
    }

    /// After a list element: `,` (more follow) or `]` (the list ends).
    fn list_next(&mut self, list: &str) -> Result<Next, ParseError> {
        match self.input.get(self.pos) {
            Some(b',') => {
                self.pos += 1;
                Ok(Next::More)
            }
            Some(b']') => {
                self.pos += 1;
                Ok(Next::End)
            }
            _ => Err(self.expected(format!("',' or ']' after an element of {list}"))),
        }
    }

    /// A quoted string with Nix's escapes; `what` names it in errors.
    fn string(&mut self, what: &'static str) -> Result<Vec<u8>, ParseError> {
        let start = self.pos;
        if self.input.get(self.pos) != Some(&b'"') {
            return Err(self.expected(format!("'\"' starting the {what} (strings are quoted)")));
        }
        self.pos += 1;
        let rest = &self.input[self.pos..];
        // Fast path: no escape before the closing quote.
        match rest.iter().position(|&b| b == b'"' || b == b'\\') {
            Some(i) if rest[i] == b'"' => {
                self.pos += i + 1;
                return Ok(rest[..i].to_vec());
            }
            Some(_) => {}
            None => {
                self.pos = self.input.len();
                return Err(
                    self.error(self.pos, ParseErrorKind::UnterminatedString { what, start })
                );
            }
        }
        let mut out = Vec::with_capacity(rest.len().min(64));
        loop {
            let rest = &self.input[self.pos..];
            let Some(i) = rest.iter().position(|&b| b == b'"' || b == b'\\') else {
                self.pos = self.input.len();
                return Err(
                    self.error(self.pos, ParseErrorKind::UnterminatedString { what, start })
                );
            };
            out.extend_from_slice(&rest[..i]);
            self.pos += i + 1;
            if rest[i] == b'"' {
                return Ok(out);
            }
            // An escape: Nix maps n, r, t and keeps any other byte as it is.
            let Some(&c) = self.input.get(self.pos) else {
                return Err(
                    self.error(self.pos, ParseErrorKind::UnterminatedString { what, start })
                );
            };
            self.pos += 1;
            out.push(match c {
                b'n' => b'\n',
                b'r' => b'\r',
                b't' => b'\t',
                c => c,
            });
        }
    }

    /// A string that must be an absolute path.
    fn path(&mut self, what: &'static str) -> Result<Vec<u8>, ParseError> {
        let start = self.pos;
        let s = self.string(what)?;
        if s.first() != Some(&b'/') {
            return Err(self.error(
                start,
                ParseErrorKind::RelativePath {
                    what,
                    path: lossy(&s),
                },
            ));
        }
        Ok(s)
    }

    fn duplicate(&self, offset: usize, what: &'static str, key: &[u8]) -> ParseError {
        self.error(
            offset,
            ParseErrorKind::Duplicate {
                what,
                key: lossy(key),
            },
        )
    }

    fn outputs(&mut self, drv: &mut Derivation) -> Result<(), ParseError> {
        if self.list_start("opening the list of outputs")? {
            return Ok(());
        }
        let mut keys = Keys::default();
        loop {
            let tuple = "in an output (name,path,hashAlgo,hash)";
            self.byte(b'(', "opening an output tuple (name,path,hashAlgo,hash)")?;
            let name_at = self.pos;
            let name = self.string("output name")?;
            self.byte(b',', tuple)?;
            let path_at = self.pos;
            let path = self.string("output path")?;
            self.byte(b',', tuple)?;
            let algo_at = self.pos;
            let hash_algo = self.string("output hash algorithm")?;
            self.byte(b',', tuple)?;
            let hash_at = self.pos;
            let hash = self.string("output hash")?;
            self.byte(b')', "closing an output tuple (name,path,hashAlgo,hash)")?;
            let output = DerivationOutput {
                path,
                hash_algo,
                hash,
            };
            if let Err(error) = output.kind() {
                let at = match error.field() {
                    OutputField::Path => path_at,
                    OutputField::HashAlgo => algo_at,
                    OutputField::Hash => hash_at,
                };
                let name = lossy(&name);
                return Err(self.error(at, ParseErrorKind::Output { name, error }));
            }
            let last = drv.outputs.last().map(|(k, _)| k.as_slice());
            if !keys.is_new(
                last,
                || drv.outputs.iter().map(|(k, _)| k.as_slice()),
                &name,
            ) {
                return Err(self.duplicate(name_at, "output name", &name));
            }
            drv.outputs.push((name, output));
            if let Next::End = self.list_next("the list of outputs")? {
                return Ok(());
            }
        }
    }

    fn input_drvs(&mut self, drv: &mut Derivation) -> Result<(), ParseError> {
        if self.list_start("opening the list of input derivations")? {
            return Ok(());
        }
        let mut keys = Keys::default();
        loop {
            self.byte(b'(', "opening an input derivation tuple (path,[outputs])")?;
            let path_at = self.pos;
            let path = self.path("input derivation path")?;
            self.byte(b',', "after the input derivation path")?;
            let names = self.string_list(
                "opening the list of outputs used from an input derivation",
                "the output names of an input derivation",
                "output name",
                Some("output name of an input derivation"),
            )?;
            self.byte(b')', "closing an input derivation tuple (path,[outputs])")?;
            let last = drv.input_drvs.last().map(|(k, _)| k.as_slice());
            if !keys.is_new(
                last,
                || drv.input_drvs.iter().map(|(k, _)| k.as_slice()),
                &path,
            ) {
                return Err(self.duplicate(path_at, "input derivation", &path));
            }
            drv.input_drvs.push((path, names));
            if let Next::End = self.list_next("the list of input derivations")? {
                return Ok(());
            }
        }
    }

    /// A list of strings. With `unique`, a repeated element is an error naming it so.
    fn string_list(
        &mut self,
        open: &str,
        list: &str,
        what: &'static str,
        unique: Option<&'static str>,
    ) -> Result<Vec<Vec<u8>>, ParseError> {
        let mut out: Vec<Vec<u8>> = Vec::new();
        if self.list_start(open)? {
            return Ok(out);
        }
        let mut keys = Keys::default();
        loop {
            let at = self.pos;
            let s = self.string(what)?;
            if let Some(dup_what) = unique {
                let last = out.last().map(Vec::as_slice);
                if !keys.is_new(last, || out.iter().map(Vec::as_slice), &s) {
                    return Err(self.duplicate(at, dup_what, &s));
                }
            }
            out.push(s);
            if let Next::End = self.list_next(list)? {
                return Ok(out);
            }
        }
    }

    fn input_srcs(&mut self, drv: &mut Derivation) -> Result<(), ParseError> {
        if self.list_start("opening the list of input sources")? {
            return Ok(());
        }
        let mut keys = Keys::default();
        loop {
            let at = self.pos;
            let path = self.path("input source path")?;
            let last = drv.input_srcs.last().map(Vec::as_slice);
            if !keys.is_new(last, || drv.input_srcs.iter().map(Vec::as_slice), &path) {
                return Err(self.duplicate(at, "input source", &path));
            }
            drv.input_srcs.push(path);
            if let Next::End = self.list_next("the list of input sources")? {
                return Ok(());
            }
        }
    }

    fn env(&mut self, drv: &mut Derivation) -> Result<(), ParseError> {
        if self.list_start("opening the environment list")? {
            return Ok(());
        }
        let mut keys = Keys::default();
        loop {
            self.byte(b'(', "opening an environment tuple (name,value)")?;
            let at = self.pos;
            let name = self.string("environment variable name")?;
            self.byte(b',', "after an environment variable name")?;
            let value = self.string("environment variable value")?;
            self.byte(b')', "closing an environment tuple (name,value)")?;
            let last = drv.env.last().map(|(k, _)| k.as_slice());
            if !keys.is_new(last, || drv.env.iter().map(|(k, _)| k.as_slice()), &name) {
                return Err(self.duplicate(at, "environment variable", &name));
            }
            drv.env.push((name, value));
            if let Next::End = self.list_next("the environment list")? {
                return Ok(());
            }
        }
    }

    fn derivation(&mut self) -> Result<Derivation, ParseError> {
        let mut drv = Derivation::default();
        self.literal(b"Derive(", "at the start of a derivation")?;
        self.outputs(&mut drv)?;
        self.byte(b',', "after the list of outputs")?;
        self.input_drvs(&mut drv)?;
        self.byte(b',', "after the list of input derivations")?;
        self.input_srcs(&mut drv)?;
        self.byte(b',', "after the list of input sources")?;
        drv.platform = self.string("system")?;
        self.byte(b',', "after the system")?;
        drv.builder = self.string("builder")?;
        self.byte(b',', "after the builder")?;
        drv.args = self.string_list(
            "opening the list of builder arguments",
            "the builder arguments",
            "builder argument",
            None,
        )?;
        self.byte(b',', "after the builder arguments")?;
        self.env(&mut drv)?;
        self.byte(b')', "closing the derivation (it has 7 fields)")?;
        if self.pos != self.input.len() {
            return Err(self.expected("end of input after the derivation's closing ')'"));
        }
        Ok(drv)
    }
}

impl Derivation {
    /// Parse a `.drv` file. Never panics; the error names the byte offset and what was
    /// expected there.
    pub fn parse(input: &[u8]) -> Result<Derivation, ParseError> {
        Parser { input, pos: 0 }.derivation()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIMPLE: &[u8] = br#"Derive([("out","/nix/store/8w0k3kb9zvjhj6mab9a1dmbbl6bb8zsx-hello","","")],[("/nix/store/0jvxqc5hvm4h6kfml5a4k4bhnswm4zjy-bash.drv",["out"])],["/nix/store/9krlzvny65gdc8s7kpb6lkx8cd02c25b-default-builder.sh"],"x86_64-linux","/bin/sh",["-e","x"],[("name","hello"),("out","/nix/store/8w0k3kb9zvjhj6mab9a1dmbbl6bb8zsx-hello")])"#;

    fn err(input: &[u8]) -> ParseError {
        Derivation::parse(input).expect_err("must fail")
    }

    #[test]
    fn parses_a_simple_derivation() {
        let d = Derivation::parse(SIMPLE).unwrap();
        assert_eq!(d.outputs.len(), 1);
        assert_eq!(d.input_drvs[0].1, vec![b"out".to_vec()]);
        assert_eq!(d.platform, b"x86_64-linux");
        assert_eq!(d.args.len(), 2);
        assert_eq!(d.env[1].0, b"out");
    }

    #[test]
    fn error_names_offset_and_expectation() {
        let e = err(b"Derivex");
        assert_eq!(e.offset, 6);
        assert_eq!(
            e.to_string(),
            "at byte 6: expected '(' after \"Derive\", found 'x'"
        );
        let e = err(b"");
        assert_eq!(e.offset, 0);
        assert!(e.to_string().contains("found end of input"), "{e}");
    }

    #[test]
    fn every_truncation_fails() {
        for n in 0..SIMPLE.len() {
            let e = err(&SIMPLE[..n]);
            assert!(e.offset <= n, "prefix {n}: {e}");
        }
    }

    #[test]
    fn escapes_follow_nix() {
        let d = Derivation::parse(br#"Derive([],[],[],"a\"b\\c\nd\re\tf\xg","",[],[])"#).unwrap();
        assert_eq!(d.platform, b"a\"b\\c\nd\re\tfxg");
    }

    #[test]
    fn refuses_trailing_data_duplicates_and_bad_lists() {
        assert!(err(br#"Derive([],[],[],"","",[],[]) "#)
            .to_string()
            .contains("end of input"));
        let e = err(br#"Derive([],[],[],"","",[],[("a","1"),("b","2"),("a","3")])"#);
        assert!(matches!(e.kind, ParseErrorKind::Duplicate { .. }), "{e}");
        let e = err(br#"Derive([],[],[],"","",[],[("b","1"),("b","2")])"#);
        assert!(matches!(e.kind, ParseErrorKind::Duplicate { .. }), "{e}");
        let e = err(br#"Derive([],[],[],"","",["a""b"],[])"#);
        assert!(e.to_string().contains("',' or ']'"), "{e}");
        let e = err(br#"Derive([],[],[,"/a"],"","",[],[])"#);
        assert_eq!(e.offset, 14, "{e}");
        let e = err(br#"Derive([],[],[],"","",[],[],[])"#);
        assert!(e.to_string().contains("closing the derivation"), "{e}");
    }

    #[test]
    fn refuses_relative_paths_and_bad_outputs() {
        let e = err(br#"Derive([],[],["a"],"","",[],[])"#);
        assert!(matches!(e.kind, ParseErrorKind::RelativePath { .. }), "{e}");
        assert_eq!(e.offset, 14);
        let e = err(br#"Derive([("out","/a","sha3","00")],[],[],"","",[],[])"#);
        assert!(matches!(e.kind, ParseErrorKind::Output { .. }), "{e}");
        assert_eq!(e.offset, 20);
        let e = err(br#"Derive([("out","/a","sha256","00")],[],[],"","",[],[])"#);
        assert_eq!(e.offset, 29, "{e}");
        let e = err(br#"Derive([("out","/a","")],[],[],"","",[],[])"#);
        assert!(e.to_string().contains("expected ','"), "{e}");
    }

    #[test]
    fn survives_deep_brackets() {
        let mut input = b"Derive(".to_vec();
        input.extend(std::iter::repeat_n(b'[', 10 << 20));
        let e = err(&input);
        assert_eq!(e.offset, 8, "{e}");
    }
}
