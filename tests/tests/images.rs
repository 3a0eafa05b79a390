//! The images `cargo xtask image` builds (podman, a COPY-only
//! Containerfile on bases imported from a debootstrap rootfs): built here
//! from the test profile's binaries (`--bins-from`; the debootstrap rootfs
//! and the agent's base are cached under target/images), then inspected:
//! entrypoint, user, the binaries and journalctl present and runnable with
//! only the image's own files (chroot into the mounted image: containers
//! cannot run on these machines), sizes reported, users equal to the
//! manifests' runAsUser, image names equal to the kustomization's.
//! Needs root (podman's storage, debootstrap, chroot).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use baton_tests::{binary, require_root, run_checked};
use serde::Deserialize;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = run_checked(Command::new(program).args(args))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Removes the test's images however the test ends.
struct Images(Vec<String>);

impl Drop for Images {
    fn drop(&mut self) {
        for image in &self.0 {
            let _ = Command::new("podman")
                .args(["image", "unmount", image])
                .output();
            let _ = Command::new("podman").args(["rmi", "-f", image]).output();
        }
    }
}

/// An image's root filesystem, mounted read-only by podman.
fn mount(image: &str) -> Result<PathBuf> {
    Ok(PathBuf::from(
        run("podman", &["image", "mount", image])?.trim(),
    ))
}

/// Runs `program` with only the image's files (its loader, its libraries).
fn run_inside(root: &Path, program: &str, args: &[&str]) -> Result<String> {
    let mut argv = vec![root.to_str().context("utf-8 path")?, program];
    argv.extend_from_slice(args);
    run("chroot", &argv)
}

/// The rendered install, as `kubectl kustomize manifests` gives it.
fn rendered_install() -> Result<Vec<Value>> {
    let text = run(
        "kubectl",
        &[
            "kustomize",
            root().join("manifests").to_str().context("path")?,
        ],
    )?;
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(&text) {
        docs.push(Value::deserialize(doc)?);
    }
    Ok(docs)
}

/// "UID:GID" a workload's container runs as, per its securityContexts.
fn manifest_user(objects: &[Value], kind: &str) -> Result<String> {
    let workload = objects
        .iter()
        .find(|o| o["kind"] == kind)
        .with_context(|| format!("no {kind}"))?;
    let pod = &workload["spec"]["template"]["spec"];
    let container = &pod["containers"][0]["securityContext"];
    let pick = |field: &str| -> Option<u64> {
        container[field]
            .as_u64()
            .or_else(|| pod["securityContext"][field].as_u64())
    };
    let user = pick("runAsUser").with_context(|| format!("{kind} sets no runAsUser"))?;
    // Without runAsGroup the image's group applies; the images use the
    // user's own group.
    let group = pick("runAsGroup").unwrap_or(user);
    Ok(format!("{user}:{group}"))
}

#[test]
fn xtask_image_builds_both_images_as_the_manifests_expect() -> Result<()> {
    require_root("building images with podman");
    let bins = binary("baton-agent")
        .parent()
        .context("bin dir")?
        .to_path_buf();
    binary("baton-coordinator");
    let tag = format!("test-{}", std::process::id());
    let agent = format!("localhost/baton-agent:{tag}");
    let coordinator = format!("localhost/baton-coordinator:{tag}");
    let _cleanup = Images(vec![agent.clone(), coordinator.clone()]);
    let xtask = binary("xtask");
    let out = Command::new(&xtask)
        .args(["image", "--tag", &tag, "--bins-from"])
        .arg(&bins)
        .output()?;
    assert!(
        out.status.success(),
        "xtask image failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);

    let install = rendered_install()?;
    for (image, kind, binary_name) in [
        (&agent, "DaemonSet", "baton-agent"),
        (&coordinator, "Deployment", "baton-coordinator"),
    ] {
        let inspected: Value = serde_json::from_str(&run("podman", &["image", "inspect", image])?)?;
        let config = &inspected[0]["Config"];
        let entrypoint = format!("/usr/local/bin/{binary_name}");
        assert_eq!(
            config["Entrypoint"],
            serde_json::json!([entrypoint]),
            "{image}"
        );
        assert_eq!(
            config["User"].as_str().context("User")?,
            manifest_user(&install, kind)?,
            "{image} runs as the user {kind} says"
        );
        assert_eq!(
            config["Labels"]["org.opencontainers.image.version"],
            env!("CARGO_PKG_VERSION")
        );
        let size = inspected[0]["Size"].as_u64().context("Size")?;
        eprintln!("{image}: {:.1} MB", size as f64 / 1e6);
        assert!(printed.contains(&format!("{image}: ")), "{printed}");

        let root = mount(image)?;
        let version = run_inside(&root, &entrypoint, &["--version"])?;
        assert!(version.starts_with(binary_name), "{version}");
        let bundle = std::fs::read_to_string(root.join("etc/ssl/certs/ca-certificates.crt"))?;
        assert!(bundle.contains("BEGIN CERTIFICATE"));
        if kind == "DaemonSet" {
            // The agent reads update units' output with journalctl.
            let journalctl = run_inside(&root, "/usr/bin/journalctl", &["--version"])?;
            assert!(journalctl.starts_with("systemd "), "{journalctl}");
        } else {
            // Distroless-like: the binary and what it needs, nothing else.
            assert!(!root.join("bin/sh").exists() && !root.join("usr/bin").exists());
            let passwd = std::fs::read_to_string(root.join("etc/passwd"))?;
            assert!(passwd.contains(":65532:65532:"), "{passwd}");
            assert!(size < 40_000_000 + std::fs::metadata(bins.join(binary_name))?.len());
        }
        run("podman", &["image", "unmount", image])?;
    }

    // The manifests name the images the task builds, so `kustomize edit
    // set image baton-agent=REGISTRY/...` (README) retargets them.
    let kustomization: Value = serde_norway::from_str(&std::fs::read_to_string(
        root().join("manifests/kustomization.yaml"),
    )?)?;
    let names: Vec<&str> = kustomization["images"]
        .as_array()
        .context("images")?
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    assert_eq!(names, ["baton-agent", "baton-coordinator"]);
    for (file, name) in [
        ("agent-daemonset.yaml", "baton-agent"),
        ("coordinator-deployment.yaml", "baton-coordinator"),
    ] {
        let text = std::fs::read_to_string(root().join("manifests").join(file))?;
        assert!(text.contains(&format!("image: {name}\n")), "{file}");
    }
    Ok(())
}
