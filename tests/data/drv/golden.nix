# Derivations for Kiln's golden tests (tests/drv_golden.rs). `nix-instantiate` on this file
# writes one .drv per attribute (and their inputs) with real Nix 2.8; Kiln must print each
# one back byte for byte, show it as `nix show-derivation` does, and compute the same paths.
# Nothing here is ever built: the builders only need to exist as strings.
{ rawFile ? ./raw-bytes.bin }:
let
  sys = "x86_64-linux";
  mk = attrs: derivation ({ system = sys; builder = "/bin/sh"; } // attrs);
  rep = n: s: builtins.concatStringsSep "" (builtins.genList (_: s) n);

  # Fixed outputs: every algorithm, flat and recursive. The hashes are of nothing in
  # particular; they only need the right length (given in base16, base32 and SRI forms).
  hashes = {
    md5 = "d41d8cd98f00b204e9800998ecf8427e";
    sha1 = "0000000000000000000000000000000000000000";
    sha256 = "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";
    sha512 = "sha512-z4PhNX7vuL3xVChQ1m2AB9Yg5AULVxXcg/SpIdNs6c5H0NE8XYXysP+DGNKHfuwvY7kxvUdBeoGlODJ6+SfaPg==";
  };
  fixed = mode: algo: mk {
    name = "fixed-${mode}-${algo}";
    outputHashMode = mode;
    outputHashAlgo = algo;
    outputHash = hashes.${algo};
  };
  fixedAll = builtins.listToAttrs (builtins.concatMap (mode: map (algo: {
    name = "fixed-${mode}-${algo}";
    value = fixed mode algo;
  }) [ "md5" "sha1" "sha256" "sha512" ]) [ "flat" "recursive" ]);

  leaf = i: mk { name = "leaf-${toString i}"; args = [ "-c" "echo ${toString i} > $out" ]; };

  src = builtins.toFile "builder.sh" ''
    echo "a \"quoted\" \\ backslash and	tab"
  '';
  src2 = builtins.toFile "refers.sh" "source ${src}";

  ca = mk {
    name = "floating";
    __contentAddressed = true;
    outputHashMode = "recursive";
    outputHashAlgo = "sha256";
    outputs = [ "out" "lib" ];
  };
  caFlat = mk {
    name = "floating-flat-sha1";
    __contentAddressed = true;
    outputHashMode = "flat";
    outputHashAlgo = "sha1";
  };
  impure = mk {
    name = "impure";
    __impure = true;
  };
  multi = mk {
    name = "multi";
    outputs = [ "out" "dev" "bin" "lib" "doc" ];
  };
in fixedAll // {
  inherit ca caFlat impure multi;

  unsorted-outputs = mk {
    name = "unsorted-outputs";
    outputs = [ "zeta" "out" "alpha" "dev" ];
    builder = "${src}";
  };

  # An input-addressed derivation whose input is floating: its outputs are deferred.
  deferred = mk {
    name = "deferred";
    args = [ "${ca}" "${ca.lib}" ];
  };

  depends-on-impure = mk {
    name = "depends-on-impure";
    __impure = true;
    args = [ "${impure}" ];
  };

  uses-outputs = mk {
    name = "uses-outputs";
    args = [ "${multi.dev}" "${multi.out}" "${multi.bin}" "${fixedAll.fixed-recursive-sha256}" "${fixedAll.fixed-flat-md5}" ];
  };

  structured = mk {
    name = "structured";
    __structuredAttrs = true;
    outputs = [ "out" "dev" ];
    nested = { list = [ 1 2.5 "three" null true ]; attrs.a."b c" = "quote \" backslash \\ newline \n"; };
    dep = multi;
  };

  pass-as-file = mk {
    name = "pass-as-file";
    passAsFile = [ "big" "small" ];
    big = rep 1000 "line\n";
    small = "x";
  };

  control-bytes = mk {
    name = "control-bytes";
    ctrl = builtins.fromJSON ''"\u0001\u0002\u0007\b\t\n\u000b\f\r\u001b\u001f\u007f"'';
    quotes = ''she said "hi" \ and \\ left'';
    unicode = "é ∀ 😀";
    args = [ "tab\there" "cr\rhere" "nl\nhere" "" ];
  };

  raw-bytes = mk {
    name = "raw-bytes";
    raw = builtins.readFile rawFile;
  };

  big-values = mk {
    name = "big-values";
    big = rep 10240 "0123456789";
    big-escaped = rep 10240 "\"\\\n\t\r";
    args = [ (rep 10240 "abcdefghij") ];
  };

  fifty-inputs = mk {
    name = "fifty-inputs";
    args = builtins.genList (i: "${leaf i}") 50;
  };

  hurd = derivation {
    name = "hurd";
    system = "i586-gnu";
    builder = "/bin/sh";
    args = [ "${leaf 1}" ];
  };

  arm = derivation {
    name = "arm";
    system = "aarch64-linux";
    builder = "/bin/sh";
    outputs = [ "out" "debug" ];
  };

  sources = mk {
    name = "sources";
    builder = "${src}";
    args = [ "${src2}" ./raw-bytes.bin ];
  };

  empty-env-value = mk {
    name = "empty-env-value";
    empty = "";
    args = [ "" ];
  };
}
