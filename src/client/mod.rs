//! The client side of the client API: the HTTP client behind `kiln submit`, `kiln builds`,
//! `kiln build ...`, `kiln agent ...`, and `kiln demo`.

pub mod cli;
pub mod demo;
