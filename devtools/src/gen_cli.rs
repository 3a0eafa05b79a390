//! `gen-cli [--check] DIR`: shell completions (bash, zsh, fish) and man pages of
//! `baton-coordinator`, `batonctl` and `baton-agent`, generated from their
//! clap definitions (clap_complete, clap_mangen) into DIR: `cargo xtask
//! gen-cli` writes them to `docs/cli/`, which is committed. A test fails
//! when the committed files differ from what the definitions give.
//!
//! The pages carry the package version, not the git revision `--version`
//! shows, so they change only when the command lines do.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;

/// The command lines documented, by program name.
fn commands() -> Vec<clap::Command> {
    [
        baton_coordinator::config::Cli::command(),
        baton_coordinator::ctl::Cli::command(),
        baton_agent::cli::Cli::command(),
    ]
    .into_iter()
    .map(|c| c.version(env!("CARGO_PKG_VERSION")))
    .collect()
}

/// Every generated file: its path under DIR and its content.
pub fn render() -> Result<BTreeMap<PathBuf, Vec<u8>>> {
    let mut files = BTreeMap::new();
    for command in commands() {
        let name = command.get_name().to_string();
        for (shell, file) in [
            (Shell::Bash, format!("{name}.bash")),
            (Shell::Zsh, format!("_{name}")),
            (Shell::Fish, format!("{name}.fish")),
        ] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut command.clone(), &name, &mut out);
            files.insert(Path::new("completions").join(file), out);
        }
        // One page per command and subcommand, named as clap_mangen's
        // generate_to names them (baton-coordinator-serve.1).
        let mut command = command.disable_help_subcommand(true);
        command.build();
        man_pages(command, &mut files)?;
    }
    Ok(files)
}

fn man_pages(command: clap::Command, files: &mut BTreeMap<PathBuf, Vec<u8>>) -> Result<()> {
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        man_pages(sub.clone(), files)?;
    }
    let man = clap_mangen::Man::new(command);
    let mut out = Vec::new();
    man.render(&mut out).context("rendering a man page")?;
    files.insert(Path::new("man").join(man.get_filename()), out);
    Ok(())
}

/// Every file under `dir`, relative to it.
fn on_disk(dir: &Path) -> Result<BTreeMap<PathBuf, Vec<u8>>> {
    let mut files = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(at) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&at) else {
            continue;
        };
        for entry in entries {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let relative = path.strip_prefix(dir)?.to_path_buf();
                files.insert(relative, std::fs::read(&path)?);
            }
        }
    }
    Ok(files)
}

/// What differs between `wanted` and the files under `dir` (empty: none).
pub fn differences(wanted: &BTreeMap<PathBuf, Vec<u8>>, dir: &Path) -> Result<Vec<String>> {
    let have = on_disk(dir)?;
    let mut out = Vec::new();
    for (path, content) in wanted {
        match have.get(path) {
            None => out.push(format!("{} is missing", path.display())),
            Some(c) if c != content => out.push(format!("{} is out of date", path.display())),
            Some(_) => {}
        }
    }
    for path in have.keys().filter(|p| !wanted.contains_key(*p)) {
        out.push(format!("{} is not generated any more", path.display()));
    }
    Ok(out)
}

/// `baton-devtools gen-cli [--check] DIR`: writes every file and removes
/// stale ones; with `--check`, only says what is stale and fails if any.
pub fn run(args: &[String]) -> Result<()> {
    let check = args.iter().any(|a| a == "--check");
    let dir = PathBuf::from(args.iter().find(|a| !a.starts_with("--")).context(
        "usage: baton-devtools gen-cli [--check] DIR (cargo xtask gen-cli writes docs/cli)",
    )?);
    let wanted = render()?;
    if check {
        let stale = differences(&wanted, &dir)?;
        anyhow::ensure!(
            stale.is_empty(),
            "{} is stale, run `cargo xtask gen-cli`: {}",
            dir.display(),
            stale.join("; ")
        );
        return Ok(());
    }
    for stale in on_disk(&dir)?.keys().filter(|p| !wanted.contains_key(*p)) {
        std::fs::remove_file(dir.join(stale))?;
    }
    for (path, content) in &wanted {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().context("a parent")?)?;
        std::fs::write(&path, content).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{} files in {}", wanted.len(), dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committed() -> PathBuf {
        crate::util::workspace_root().join("docs/cli")
    }

    #[test]
    fn the_committed_cli_docs_are_current() {
        let wanted = render().unwrap();
        let stale = differences(&wanted, &committed()).unwrap();
        assert!(
            stale.is_empty(),
            "docs/cli is stale, run `cargo xtask gen-cli` and commit: {stale:?}"
        );
    }

    #[test]
    fn every_program_and_subcommand_is_documented() {
        let wanted = render().unwrap();
        for file in [
            "man/baton-coordinator.1",
            "man/baton-coordinator-serve.1",
            "man/batonctl.1",
            "man/batonctl-status.1",
            "man/batonctl-force-release.1",
            "man/baton-agent-run.1",
            "completions/batonctl.bash",
            "completions/_baton-agent",
            "completions/baton-coordinator.fish",
        ] {
            assert!(wanted.contains_key(Path::new(file)), "{file} not generated");
        }
        let page = String::from_utf8_lossy(&wanted[Path::new("man/batonctl.1")]);
        assert!(page.contains("\\-\\-kube"), "batonctl.1 documents --kube");
    }

    #[test]
    fn a_changed_flag_makes_the_docs_stale() {
        let dir = tempfile_dir();
        let mut wanted = render().unwrap();
        for (path, content) in &wanted {
            let path = dir.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }
        assert!(differences(&wanted, &dir).unwrap().is_empty());
        let page = wanted
            .get_mut(Path::new("man/batonctl-pause.1"))
            .expect("the pause page");
        page.extend_from_slice(b".SH NEW\n");
        std::fs::write(dir.join("man/extra.1"), "old").unwrap();
        let stale = differences(&wanted, &dir).unwrap();
        assert_eq!(
            stale,
            [
                "man/batonctl-pause.1 is out of date",
                "man/extra.1 is not generated any more"
            ]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("gen-cli-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
