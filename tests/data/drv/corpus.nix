# A corpus of many small, varied derivations for benches/drv_parse.rs: `n` derivations, each
# depending on up to three earlier ones, with a mix of output counts, fixed outputs, script
# sizes and escaped characters, roughly like the derivations of a package set.
{ n ? 1000 }:
let
  sys = [ "x86_64-linux" "aarch64-linux" "i586-gnu" ];
  line = i: "echo \"step ${toString i}\" && cp -r $src/lib/part-${toString i} $out/share\t# note\n";
  script = i: builtins.concatStringsSep "" (builtins.genList line (1 + i - (i / 12) * 12));
  deps = i: builtins.genList (j: builtins.elemAt drvs (i - j - 1)) (if i < 3 then i else 1 + i - (i / 3) * 3);
  mk = i:
    let
      name = "pkg-${toString i}";
      base = {
        inherit name;
        system = builtins.elemAt sys (i - (i / 3) * 3);
        builder = "/bin/sh";
        args = [ "-e" (builtins.toFile "builder-${toString (i - (i / 50) * 50)}.sh" "set -e\n${script 3}") ];
        buildInputs = map (d: "${d}") (deps i);
        buildPhase = script i;
        version = "1.${toString i}";
        meta = "A package number ${toString i} with \"quotes\" and a \\ backslash";
      };
    in
      if i - (i / 5) * 5 == 0 then derivation (base // {
        outputHashMode = if i - (i / 2) * 2 == 0 then "recursive" else "flat";
        outputHashAlgo = "sha256";
        outputHash = builtins.hashString "sha256" name;
      })
      else derivation (base // {
        outputs = if i - (i / 4) * 4 == 1 then [ "out" "dev" "lib" ] else [ "out" ];
      });
  drvs = builtins.genList mk n;
in drvs
