//! `cargo xtask image`: the agent and coordinator images, built here with
//! podman from the release binaries, with no registry and no network.
//!
//! Containers cannot run on these machines, so nothing is built *inside* a
//! container: `images/Containerfile` only COPYs, on bases imported from root
//! filesystems made here.
//! - The agent's base is a Debian bookworm minbase made with debootstrap,
//!   with `systemd` (journalctl, which the agent runs to read an update
//!   unit's output) and `ca-certificates` included, pruned of
//!   documentation, locales and apt's caches (the dpkg database stays, so
//!   scanners still see every package). It is cached under
//!   `target/images/` (built in a temp dir and renamed into place).
//! - The coordinator's base is distroless-like: copied file by file from
//!   that rootfs, only what the binary needs (the shared libraries `ldd`
//!   names, with their symlinks as the rootfs has them; the CA bundle;
//!   passwd and group naming uid 65532).
//!
//! The binaries are copied with `strip --strip-debug` (the release
//! profile's line tables would be most of their size).
//!
//! Options: `--bins-from DIR` takes the binaries from DIR instead of
//! building release binaries (the image test uses its debug binaries);
//! `--tag TAG` (default: the workspace version); `--repository PREFIX`
//! (default `localhost`), giving `PREFIX/baton-agent:TAG` and
//! `PREFIX/baton-coordinator:TAG`.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::{deps, util};

/// The Debian release of both bases (the release the binaries are built
/// on, so their glibc matches).
const SUITE: &str = "bookworm";
/// Packages added to the agent's minbase.
const AGENT_INCLUDE: &str = "systemd,ca-certificates";
/// The coordinator's unprivileged user (the manifests' runAsUser).
const NONROOT: u32 = 65532;

/// What to build.
struct Options {
    bins_from: Option<PathBuf>,
    tag: String,
    repository: String,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut options = Options {
        bins_from: None,
        tag: env!("CARGO_PKG_VERSION").to_string(),
        repository: "localhost".to_string(),
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .cloned()
                .with_context(|| format!("{name} needs a value"))
        };
        match arg.as_str() {
            "--bins-from" => options.bins_from = Some(PathBuf::from(value(arg)?)),
            "--tag" => options.tag = value(arg)?,
            "--repository" => options.repository = value(arg)?,
            other => bail!(
                "unknown option {other:?}\nusage: cargo xtask image [--bins-from DIR] [--tag TAG] [--repository PREFIX]"
            ),
        }
    }
    Ok(options)
}

/// `cargo xtask image [--bins-from DIR] [--tag TAG] [--repository PREFIX]`.
pub fn run(args: &[String]) -> Result<()> {
    let options = parse(args)?;
    let bins = match &options.bins_from {
        Some(dir) => {
            deps::ensure(deps::IMAGES)?;
            dir.clone()
        }
        None => {
            deps::ensure(&[deps::BUILD, deps::IMAGES].concat())?;
            util::build_release_bins()?;
            util::target_dir().join("release")
        }
    };
    let work = util::target_dir().join("images");
    fs::create_dir_all(&work)?;
    let rootfs = agent_rootfs(&work)?;
    let agent_base = import_agent_base(&rootfs)?;
    let coordinator_base = import_coordinator_base(&rootfs, &bins, &work)?;

    let context = tempdir_in(&work, "context")?;
    for binary in ["baton-agent", "baton-coordinator"] {
        let from = bins.join(binary);
        let to = context.join(binary);
        fs::copy(&from, &to).with_context(|| format!("copying {} (built?)", from.display()))?;
        // The release profile keeps line tables (for backtraces on the
        // developer's machine); in the image they would be ~80% of the
        // binary. Symbols stay, so a panic's backtrace still names functions.
        let status = Command::new("strip")
            .arg("--strip-debug")
            .arg(&to)
            .status()
            .context("running strip")?;
        if !status.success() {
            bail!("strip --strip-debug {} failed ({status})", to.display());
        }
    }
    let containerfile = util::workspace_root().join("images/Containerfile");
    for target in ["agent", "coordinator"] {
        let image = format!("{}/baton-{target}:{}", options.repository, options.tag);
        let previous = podman_output(&["image", "inspect", "--format", "{{.Id}}", &image]).ok();
        podman(
            &[
                "build",
                // Everything is local: never ask a registry.
                "--pull=never",
                "--network=none",
                "--target",
                target,
                "--build-arg",
                &format!("AGENT_BASE={agent_base}"),
                "--build-arg",
                &format!("COORDINATOR_BASE={coordinator_base}"),
                "--build-arg",
                &format!("VERSION={}", env!("CARGO_PKG_VERSION")),
                "--build-arg",
                &format!("REVISION={}", git_revision()),
                "--tag",
                &image,
                "--file",
                &containerfile.display().to_string(),
                &context.display().to_string(),
            ],
            None,
        )?;
        // A rebuild moves the tag; the image it leaves behind goes (a
        // failure here only leaves it dangling).
        let id = podman_output(&["image", "inspect", "--format", "{{.Id}}", &image])?;
        if let Some(previous) = previous.filter(|p| p.trim() != id.trim()) {
            let _ = podman_succeeds(&["rmi", previous.trim()]);
        }
        let size = podman_output(&["image", "inspect", "--format", "{{.Size}}", &image])?;
        let mb = size.trim().parse::<f64>().unwrap_or(0.0) / 1e6;
        println!("{image}: {mb:.1} MB");
    }
    fs::remove_dir_all(&context)?;
    Ok(())
}

/// The agent's base rootfs, made once with debootstrap and cached.
fn agent_rootfs(work: &Path) -> Result<PathBuf> {
    let rootfs = work.join(format!(
        "rootfs-{SUITE}-minbase-{}",
        AGENT_INCLUDE.replace(',', "+")
    ));
    if rootfs.join("usr/bin/journalctl").exists() {
        return Ok(rootfs);
    }
    let build = tempdir_in(work, "rootfs")?;
    let target = build.join("rootfs");
    eprintln!(
        "xtask: debootstrap {SUITE} minbase with {AGENT_INCLUDE} (once; cached in {})",
        rootfs.display()
    );
    let status = Command::new("debootstrap")
        .args([
            "--variant=minbase",
            &format!("--include={AGENT_INCLUDE}"),
            SUITE,
        ])
        .arg(&target)
        .arg(debian_mirror())
        .stdout(Stdio::null())
        .status()
        .context("running debootstrap")?;
    if !status.success() {
        bail!(
            "debootstrap failed ({status}); its log is {}/debootstrap/debootstrap.log",
            target.display()
        );
    }
    prune(&target)?;
    fs::rename(&target, &rootfs)?;
    fs::remove_dir_all(&build)?;
    Ok(rootfs)
}

/// Removes what nothing reads at run time: documentation, manual pages,
/// locales, apt's package lists and downloaded packages, logs.
fn prune(rootfs: &Path) -> Result<()> {
    for dir in [
        "usr/share/doc",
        "usr/share/man",
        "usr/share/info",
        "usr/share/locale",
        "usr/share/lintian",
        "var/cache/apt",
        "var/lib/apt/lists",
        "var/log",
        "var/cache/debconf",
    ] {
        let dir = rootfs.join(dir);
        if !dir.exists() {
            continue;
        }
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() && !path.is_symlink() {
                fs::remove_dir_all(&path)?;
            } else {
                fs::remove_file(&path)?;
            }
        }
    }
    // Leftovers of debootstrap itself.
    let _ = fs::remove_dir_all(rootfs.join("debootstrap"));
    Ok(())
}

/// Identifies one build of the cached rootfs (its inode change time), so
/// bases made from a rebuilt rootfs get new tags.
fn rootfs_stamp(rootfs: &Path) -> Result<i64> {
    use std::os::unix::fs::MetadataExt;
    Ok(fs::metadata(rootfs)?.ctime())
}

/// Imports the agent's rootfs once per build of it.
fn import_agent_base(rootfs: &Path) -> Result<String> {
    let image = format!(
        "localhost/baton-agent-base:{SUITE}-{}",
        rootfs_stamp(rootfs)?
    );
    if !podman_succeeds(&["image", "exists", &image]) {
        import(rootfs, &image)?;
    }
    Ok(image)
}

/// Builds the coordinator's distroless-like rootfs from `rootfs` and
/// imports it, once per rootfs and set of libraries the binary needs.
fn import_coordinator_base(rootfs: &Path, bins: &Path, work: &Path) -> Result<String> {
    let binary = bins.join("baton-coordinator");
    let mut wanted: BTreeSet<String> = shared_libraries(&binary)?;
    // FNV-1a of the library list: the base's content is the rootfs's files
    // at these paths plus the fixed files below.
    let digest = wanted
        .iter()
        .flat_map(|p| p.bytes().chain([0]))
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    let image = format!(
        "localhost/baton-coordinator-base:{SUITE}-{}-{digest:016x}",
        rootfs_stamp(rootfs)?
    );
    if podman_succeeds(&["image", "exists", &image]) {
        return Ok(image);
    }
    let out = tempdir_in(work, "coordinator-rootfs")?;
    wanted.extend(
        [
            "/etc/ssl/certs/ca-certificates.crt",
            "/etc/nsswitch.conf",
            "/etc/os-release",
        ]
        .map(str::to_string),
    );
    for path in &wanted {
        copy_from_rootfs(rootfs, &out, Path::new(path))
            .with_context(|| format!("copying {path} from {}", rootfs.display()))?;
    }
    fs::write(
        out.join("etc/passwd"),
        format!(
            "root:x:0:0:root:/root:/usr/sbin/nologin\nnonroot:x:{NONROOT}:{NONROOT}:nonroot:/home/nonroot:/usr/sbin/nologin\n"
        ),
    )?;
    fs::write(
        out.join("etc/group"),
        format!("root:x:0:\nnonroot:x:{NONROOT}:\n"),
    )?;
    for dir in ["tmp", "home/nonroot"] {
        fs::create_dir_all(out.join(dir))?;
    }
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(out.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    std::os::unix::fs::chown(out.join("home/nonroot"), Some(NONROOT), Some(NONROOT))
        .context("giving /home/nonroot to the nonroot user (run as root)")?;
    import(&out, &image)?;
    fs::remove_dir_all(&out)?;
    Ok(image)
}

/// `tar` of `dir` (owners as on disk, numeric) into `podman import`.
fn import(dir: &Path, image: &str) -> Result<()> {
    let mut tar = Command::new("tar")
        .args(["--numeric-owner", "--sort=name", "-C"])
        .arg(dir)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .context("running tar")?;
    let stream = tar.stdout.take().context("tar's stdout")?;
    let imported = podman(&["import", "--quiet", "-", image], Some(stream.into()));
    let tar_status = tar.wait()?;
    imported?;
    if !tar_status.success() {
        bail!("tar of {} failed ({tar_status})", dir.display());
    }
    Ok(())
}

/// The absolute paths of the shared libraries (and the loader) `binary`
/// needs, as `ldd` names them.
fn shared_libraries(binary: &Path) -> Result<BTreeSet<String>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .with_context(|| format!("running ldd {}", binary.display()))?;
    if !out.status.success() {
        bail!(
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libraries = BTreeSet::new();
    for line in text.lines() {
        if line.contains("not found") {
            bail!("{}: a library is missing: {line}", binary.display());
        }
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; linux-vdso has no file.
        let path = line
            .split("=>")
            .last()
            .and_then(|p| p.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        if let Some(path) = path {
            libraries.insert(path.to_string());
        }
    }
    if libraries.is_empty() {
        bail!("ldd named no library for {}", binary.display());
    }
    Ok(libraries)
}

/// Copies `path` from the rootfs `from` into `to` at the same place,
/// recreating every symlink met on the way (relative to `from`'s root, as
/// the running image will resolve it) and copying the final file.
fn copy_from_rootfs(from: &Path, to: &Path, path: &Path) -> Result<()> {
    let mut hops = 0;
    let mut pending: Vec<PathBuf> = vec![path.to_path_buf()];
    while let Some(path) = pending.pop() {
        let mut at = PathBuf::from("/");
        let components: Vec<Component> = path.components().collect();
        for (i, component) in components.iter().enumerate() {
            match component {
                Component::RootDir | Component::CurDir => continue,
                Component::ParentDir => {
                    at.pop();
                    continue;
                }
                Component::Normal(name) => at.push(name),
                Component::Prefix(_) => bail!("not a Unix path: {}", path.display()),
            }
            let source = from.join(at.strip_prefix("/")?);
            let meta = fs::symlink_metadata(&source)
                .with_context(|| format!("{} is not in the rootfs", at.display()))?;
            let dest = to.join(at.strip_prefix("/")?);
            if meta.file_type().is_symlink() {
                let link = fs::read_link(&source)?;
                if fs::symlink_metadata(&dest).is_err() {
                    fs::create_dir_all(dest.parent().context("a parent")?)?;
                    std::os::unix::fs::symlink(&link, &dest)?;
                }
                hops += 1;
                if hops > 40 {
                    bail!("too many symlinks resolving {}", path.display());
                }
                // Continue from the link's target, then the rest of the path.
                let base = if link.is_absolute() {
                    PathBuf::from("/")
                } else {
                    at.parent()
                        .map(Path::to_path_buf)
                        .unwrap_or_else(|| "/".into())
                };
                let mut next = base.join(&link);
                for rest in &components[i + 1..] {
                    next.push(rest.as_os_str());
                }
                pending.push(next);
                break;
            }
            if i + 1 == components.len() {
                if meta.is_dir() {
                    fs::create_dir_all(&dest)?;
                } else {
                    fs::create_dir_all(dest.parent().context("a parent")?)?;
                    fs::copy(&source, &dest)?;
                }
            }
        }
    }
    Ok(())
}

/// The Debian mirror this machine's apt uses (deb.debian.org otherwise).
fn debian_mirror() -> String {
    let mut texts: Vec<String> = fs::read_to_string("/etc/apt/sources.list")
        .into_iter()
        .collect();
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        texts.extend(
            entries
                .flatten()
                .filter_map(|e| fs::read_to_string(e.path()).ok()),
        );
    }
    texts
        .iter()
        .flat_map(|t| t.split_whitespace())
        .find(|w| w.starts_with("http") && w.trim_end_matches('/').ends_with("/debian"))
        .map(str::to_string)
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_string())
}

/// The git revision of the workspace, or "unknown" without git.
fn git_revision() -> String {
    Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(util::workspace_root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".to_string())
}

/// A fresh directory under `parent` (xtask has no tempfile crate).
fn tempdir_in(parent: &Path, prefix: &str) -> Result<PathBuf> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let dir = parent.join(format!(".{prefix}.{}.{nanos}", std::process::id()));
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn podman(args: &[&str], stdin: Option<Stdio>) -> Result<()> {
    let mut command = Command::new("podman");
    command.args(args);
    if let Some(stdin) = stdin {
        command.stdin(stdin);
    }
    let status = command.status().context("running podman")?;
    if !status.success() {
        bail!(
            "podman {} failed ({status})",
            args.first().copied().unwrap_or_default()
        );
    }
    Ok(())
}

fn podman_output(args: &[&str]) -> Result<String> {
    let out = Command::new("podman")
        .args(args)
        .output()
        .context("running podman")?;
    if !out.status.success() {
        bail!(
            "podman {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn podman_succeeds(args: &[&str]) -> bool {
    Command::new("podman")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copying_from_a_rootfs_keeps_its_symlinks_and_never_reads_the_host() {
        let base = std::env::temp_dir().join(format!("xtask-image-test-{}", std::process::id()));
        let from = base.join("from");
        let to = base.join("to");
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(from.join("usr/lib/x86_64-linux-gnu")).unwrap();
        fs::create_dir_all(from.join("usr/lib64")).unwrap();
        fs::write(from.join("usr/lib/x86_64-linux-gnu/ld.so"), "loader").unwrap();
        // Merged /usr: /lib and /lib64 are relative links; the loader's
        // link is absolute (it must resolve inside the rootfs, not on the
        // host).
        std::os::unix::fs::symlink("usr/lib", from.join("lib")).unwrap();
        std::os::unix::fs::symlink("usr/lib64", from.join("lib64")).unwrap();
        std::os::unix::fs::symlink(
            "/lib/x86_64-linux-gnu/ld.so",
            from.join("usr/lib64/ld-linux-x86-64.so.2"),
        )
        .unwrap();
        copy_from_rootfs(&from, &to, Path::new("/lib64/ld-linux-x86-64.so.2")).unwrap();
        assert_eq!(
            fs::read_link(to.join("lib64")).unwrap(),
            Path::new("usr/lib64")
        );
        assert_eq!(fs::read_link(to.join("lib")).unwrap(), Path::new("usr/lib"));
        assert_eq!(
            fs::read_link(to.join("usr/lib64/ld-linux-x86-64.so.2")).unwrap(),
            Path::new("/lib/x86_64-linux-gnu/ld.so")
        );
        assert_eq!(
            fs::read_to_string(to.join("usr/lib/x86_64-linux-gnu/ld.so")).unwrap(),
            "loader"
        );
        let missing = copy_from_rootfs(&from, &to, Path::new("/etc/passwd"));
        assert!(missing.is_err(), "a file missing in the rootfs is an error");
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn options_parse_and_refuse_unknown_ones() {
        let o = parse(&[
            "--tag".into(),
            "t1".into(),
            "--repository".into(),
            "r.example/x".into(),
        ])
        .unwrap();
        assert_eq!(
            (o.tag.as_str(), o.repository.as_str()),
            ("t1", "r.example/x")
        );
        assert!(parse(&["--tga".into()]).is_err());
        assert!(parse(&["--tag".into()]).is_err());
    }
}
