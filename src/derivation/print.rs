//! The `.drv` ATerm printer. It writes the derivation's fields in the order they are held
//! (file order for a parsed derivation), so printing a parsed canonical file gives back the
//! same bytes. Every string is escaped (`\"` `\\` `\n` `\r` `\t`), which makes
//! `parse(print(d)) == d` hold for any bytes; Nix writes the same escapes for every string it
//! can legitimately produce (see `docs/derivations.md` for the fields Nix leaves unescaped and
//! why that only matters for path computations, done in `paths.rs`).

use std::io::{self, Write};

use super::Derivation;

/// Append `s` quoted, with Nix's escapes.
pub(crate) fn push_escaped(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    let mut rest = s;
    while let Some(i) = rest
        .iter()
        .position(|&b| matches!(b, b'"' | b'\\' | b'\n' | b'\r' | b'\t'))
    {
        out.extend_from_slice(&rest[..i]);
        out.extend_from_slice(match rest[i] {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            _ => b"\\t",
        });
        rest = &rest[i + 1..];
    }
    out.extend_from_slice(rest);
    out.push(b'"');
}

/// Append `s` quoted but not escaped, as Nix's `printUnquotedString` does.
pub(crate) fn push_raw(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    out.extend_from_slice(s);
    out.push(b'"');
}

/// Append `[s1,s2,…]`, each string written by `item`.
pub(crate) fn push_list<'s>(
    out: &mut Vec<u8>,
    items: impl IntoIterator<Item = &'s [u8]>,
    item: fn(&mut Vec<u8>, &[u8]),
) {
    out.push(b'[');
    for (i, s) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        item(out, s);
    }
    out.push(b']');
}

impl Derivation {
    /// The derivation in ATerm form, fields in the order held.
    pub fn print(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.size_hint());
        self.print_into(&mut out);
        out
    }

    /// Write [`Derivation::print`]'s bytes to `w`.
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        w.write_all(&self.print())
    }

    fn size_hint(&self) -> usize {
        let strs = |v: &[Vec<u8>]| v.iter().map(|s| s.len() + 3).sum::<usize>();
        let outputs: usize = self
            .outputs
            .iter()
            .map(|(n, o)| n.len() + o.path.len() + o.hash_algo.len() + o.hash.len() + 15)
            .sum();
        let inputs: usize = self
            .input_drvs
            .iter()
            .map(|(p, o)| p.len() + strs(o) + 8)
            .sum();
        let env: usize = self.env.iter().map(|(k, v)| k.len() + v.len() + 8).sum();
        // Escapes make the output a little longer; the vector grows if needed.
        64 + outputs
            + inputs
            + strs(&self.input_srcs)
            + self.platform.len()
            + self.builder.len()
            + strs(&self.args)
            + env
    }

    fn print_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"Derive([");
        for (i, (name, o)) in self.outputs.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.push(b'(');
            push_escaped(out, name);
            for field in [&o.path, &o.hash_algo, &o.hash] {
                out.push(b',');
                push_escaped(out, field);
            }
            out.push(b')');
        }
        out.extend_from_slice(b"],[");
        for (i, (path, names)) in self.input_drvs.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.push(b'(');
            push_escaped(out, path);
            out.push(b',');
            push_list(out, names.iter().map(Vec::as_slice), push_escaped);
            out.push(b')');
        }
        out.extend_from_slice(b"],");
        push_list(out, self.input_srcs.iter().map(Vec::as_slice), push_escaped);
        out.push(b',');
        push_escaped(out, &self.platform);
        out.push(b',');
        push_escaped(out, &self.builder);
        out.push(b',');
        push_list(out, self.args.iter().map(Vec::as_slice), push_escaped);
        out.extend_from_slice(b",[");
        for (i, (k, v)) in self.env.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.push(b'(');
            push_escaped(out, k);
            out.push(b',');
            push_escaped(out, v);
            out.push(b')');
        }
        out.extend_from_slice(b"])");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_exactly_nix_escapes() {
        let mut out = Vec::new();
        push_escaped(&mut out, b"a\"b\\c\nd\re\tf\x00\xff");
        assert_eq!(out, b"\"a\\\"b\\\\c\\nd\\re\\tf\x00\xff\"");
    }

    #[test]
    fn prints_empty_derivation() {
        assert_eq!(
            Derivation::default().print(),
            br#"Derive([],[],[],"","",[],[])"#
        );
    }
}
