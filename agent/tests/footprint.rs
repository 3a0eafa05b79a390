//! The agent's binary is linked to keep its resident memory small: its
//! relative relocations are packed (DT_RELR, see build-support/build.rs).
//! Unpacked, the loader reads a 0.8 MB `.rela.dyn` at every start and it
//! stays resident: 8% of the agent's idle RSS, whose budget is 10 MB
//! (`cargo xtask bench agent` measures the RSS itself, on a release build).

#![cfg(all(target_os = "linux", target_env = "gnu"))]

use object::{Object, ObjectSection};

/// `.rela.dyn` may keep the few relocations that are not relative (to
/// glibc's symbols); everything else belongs in `.relr.dyn`.
const RELA_DYN_MAX_BYTES: u64 = 64 * 1024;

#[test]
fn the_agents_relative_relocations_are_packed() {
    let path = env!("CARGO_BIN_EXE_baton-agent");
    let data = std::fs::read(path).expect("reading the agent's binary");
    let elf = object::File::parse(&*data).expect("the agent's binary is ELF");
    let size = |name: &str| elf.section_by_name(name).map(|s| s.size());
    let relr = size(".relr.dyn");
    assert!(
        relr.is_some_and(|n| n > 0),
        "{path} has no .relr.dyn: linked without -z pack-relative-relocs"
    );
    let rela = size(".rela.dyn").unwrap_or(0);
    assert!(
        rela <= RELA_DYN_MAX_BYTES,
        "{path}'s .rela.dyn is {rela} bytes (at most {RELA_DYN_MAX_BYTES} when packed)"
    );
}
