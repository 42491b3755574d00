//! Derivations: the ATerm `.drv` format Nix and Guix write, store paths and store directories,
//! Nix base32 and hashes, and the path computations Nix does (a `.drv`'s own path, output
//! paths through `hashDerivationModulo`). Strings in derivations are bytes, not UTF-8.
//!
//! This module compiles without the coordinator's dependencies: the agent uses it.

pub mod base32;
mod check;
pub mod cli;
pub mod hash;
mod json;
mod modulo;
mod output;
mod parse;
pub mod paths;
mod print;
pub mod store_path;

pub use check::{check, CheckReport};
pub use hash::{Hash, HashAlgo};
pub use modulo::{DrvHash, DrvHashKind, Loader, OutputPath, PathComputer};
pub use output::{FileIngestionMethod, OutputError, OutputKind};
pub use parse::{Found, ParseError, ParseErrorKind};
pub use paths::{
    canonical_bytes, derivation_type, drv_path, hash_placeholder, make_fixed_output_path,
    make_output_path, make_store_path, make_text_path, DerivationType, PathError,
};
pub use store_path::{StoreDir, StorePath, StorePathError};

/// One output of a derivation, as the three strings of the `.drv` tuple
/// `("name","path","hashAlgo","hash")`. Kept raw so printing is byte-exact; see
/// [`DerivationOutput::kind`] for the meaning.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DerivationOutput {
    pub path: Vec<u8>,
    pub hash_algo: Vec<u8>,
    pub hash: Vec<u8>,
}

/// A parsed `.drv`: `Derive([outputs],[inputDrvs],[inputSrcs],"system","builder",[args],[env])`.
/// Lists keep file order so a parsed file prints back byte for byte.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Derivation {
    /// Output name -> output.
    pub outputs: Vec<(Vec<u8>, DerivationOutput)>,
    /// Input `.drv` path -> the output names used from it.
    pub input_drvs: Vec<(Vec<u8>, Vec<Vec<u8>>)>,
    /// Input sources: store paths used as they are.
    pub input_srcs: Vec<Vec<u8>>,
    /// The system (`x86_64-linux`, `i586-gnu`, `builtin`, ...).
    pub platform: Vec<u8>,
    pub builder: Vec<u8>,
    pub args: Vec<Vec<u8>>,
    /// Environment, name -> value.
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
}

#[cfg(test)]
mod proptests;
