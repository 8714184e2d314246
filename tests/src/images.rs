//! Container images the tests build on this machine, from Debian's own packages, without a
//! registry.
//!
//! [`debian_base_image`] builds a Debian bookworm root filesystem with `debootstrap` from the
//! mirror this machine's apt already uses, and imports it into the local Docker engine. The
//! image is built once per machine: later calls (and other test processes) find the tag and
//! return at once; a file lock makes parallel test processes wait for the one that builds it.
//! [`debian_systemd_image`] adds systemd to it, for tests that need a real init.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Tag of the Debian bookworm base image built by [`debian_base_image`].
pub const DEBIAN_BASE_IMAGE: &str = "gantry-test/debian:bookworm";

/// The Debian release the base image is built from.
const SUITE: &str = "bookworm";

/// Packages added to debootstrap's minimal base (`curl` fetches, e.g., the install script).
const INCLUDE: &str = "curl,ca-certificates";

/// Overrides the mirror read from apt's sources.
const MIRROR_ENV: &str = "GANTRY_DEBIAN_MIRROR";

/// Build (once) and return the tag of a local Debian bookworm image: debootstrap's `minbase`
/// variant plus curl and CA certificates, imported with `docker import` as
/// [`DEBIAN_BASE_IMAGE`]. Nothing is pulled from a registry; packages come from the Debian
/// mirror in `/etc/apt/sources.list` or `/etc/apt/sources.list.d/` (or `GANTRY_DEBIAN_MIRROR`).
///
/// Needs the docker CLI with a reachable engine, `debootstrap`, root, and access to the mirror;
/// each missing piece is a clear error.
pub fn debian_base_image() -> Result<String> {
    docker_reachable()?;
    if image_exists(DEBIAN_BASE_IMAGE) {
        return Ok(DEBIAN_BASE_IMAGE.to_string());
    }
    // One builder per machine: other processes wait here, then find the image.
    let lock_path = std::env::temp_dir().join("gantry-test-debian-bookworm.lock");
    let lock = File::create(&lock_path).with_context(|| format!("creating the lock file {}", lock_path.display()))?;
    lock.lock().with_context(|| format!("locking {}", lock_path.display()))?;
    if image_exists(DEBIAN_BASE_IMAGE) {
        return Ok(DEBIAN_BASE_IMAGE.to_string());
    }
    let work = std::env::temp_dir().join(format!("gantry-debootstrap-{}-{:08x}", std::process::id(), rand::random::<u32>()));
    let built = build(&work);
    let _ = std::fs::remove_dir_all(&work);
    built?;
    Ok(DEBIAN_BASE_IMAGE.to_string())
}

/// Tag of the image built by [`debian_systemd_image`].
pub const DEBIAN_SYSTEMD_IMAGE: &str = "gantry-test/debian-systemd:bookworm";

/// Build (once) and return the tag of [`DEBIAN_BASE_IMAGE`] plus systemd as its init, for
/// tests that run programs under a real systemd. Packages come from the base image's Debian
/// mirror (apt inside `docker build`, on the host network). Run it with
/// `--tmpfs /run --tmpfs /run/lock -v /sys/fs/cgroup:/sys/fs/cgroup:ro` and
/// `/lib/systemd/systemd` as the command; no extra privileges are needed.
pub fn debian_systemd_image() -> Result<String> {
    let base = debian_base_image()?;
    if image_exists(DEBIAN_SYSTEMD_IMAGE) {
        return Ok(DEBIAN_SYSTEMD_IMAGE.to_string());
    }
    let lock_path = std::env::temp_dir().join("gantry-test-debian-systemd.lock");
    let lock = File::create(&lock_path).with_context(|| format!("creating the lock file {}", lock_path.display()))?;
    lock.lock().with_context(|| format!("locking {}", lock_path.display()))?;
    if image_exists(DEBIAN_SYSTEMD_IMAGE) {
        return Ok(DEBIAN_SYSTEMD_IMAGE.to_string());
    }
    let work = std::env::temp_dir().join(format!("gantry-systemd-image-{}-{:08x}", std::process::id(), rand::random::<u32>()));
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let dockerfile = format!(
        "FROM {base}\n\
         RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd systemd-sysv \\\n\
         \x20   && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb\n\
         STOPSIGNAL SIGRTMIN+3\n\
         CMD [\"/lib/systemd/systemd\"]\n"
    );
    std::fs::write(work.join("Dockerfile"), dockerfile).context("writing the Dockerfile")?;
    let built =
        run(Command::new("docker").args(["build", "-q", "--network", "host", "-t", DEBIAN_SYSTEMD_IMAGE]).arg(&work), "docker build of the systemd image");
    let _ = std::fs::remove_dir_all(&work);
    built?;
    Ok(DEBIAN_SYSTEMD_IMAGE.to_string())
}

fn build(work: &Path) -> Result<()> {
    if !Path::new("/usr/sbin/debootstrap").exists() && !on_path("debootstrap") {
        bail!("debootstrap is not installed: the Debian base image is built with it (apt-get install -y debootstrap)");
    }
    // debootstrap needs root to chroot and to create device files.
    let uid = run(Command::new("id").arg("-u"), "id -u")?;
    if uid.trim() != "0" {
        bail!("building the Debian base image with debootstrap needs root (running as uid {})", uid.trim());
    }
    let mirror = debian_mirror()?;
    let root = work.join("root");
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    run(
        Command::new("debootstrap").args(["--variant=minbase", &format!("--include={INCLUDE}"), SUITE]).arg(&root).arg(&mirror),
        &format!("debootstrap {SUITE} from {mirror}"),
    )?;
    // Downloaded packages and apt lists are not needed in the image.
    for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        clear_files(&root.join(dir));
    }
    let tar = work.join("rootfs.tar");
    run(
        Command::new("tar")
            .args(["--numeric-owner", "--exclude=./proc/*", "--exclude=./sys/*", "--exclude=./dev/*", "-C"])
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg("."),
        "tar of the debootstrap root",
    )?;
    run(
        Command::new("docker")
            .args([
                "import",
                "--change",
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--change",
                "CMD [\"/bin/bash\"]",
                "--message",
                "Debian bookworm (debootstrap minbase + curl, ca-certificates) for Gantry's tests",
            ])
            .arg(&tar)
            .arg(DEBIAN_BASE_IMAGE),
        &format!("docker import {DEBIAN_BASE_IMAGE}"),
    )?;
    Ok(())
}

/// The Debian mirror apt uses for bookworm on this machine (or `GANTRY_DEBIAN_MIRROR`).
pub fn debian_mirror() -> Result<String> {
    if let Ok(mirror) = std::env::var(MIRROR_ENV) {
        if !mirror.trim().is_empty() {
            return Ok(mirror.trim().to_string());
        }
    }
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    for file in &files {
        let Ok(text) = std::fs::read_to_string(file) else { continue };
        let found = match file.extension().and_then(|e| e.to_str()) {
            Some("sources") => mirror_in_deb822(&text),
            Some("list") => mirror_in_one_line(&text),
            _ if file.ends_with("sources.list") => mirror_in_one_line(&text),
            _ => None,
        };
        if let Some(mirror) = found {
            return Ok(mirror);
        }
    }
    bail!(
        "no Debian {SUITE} mirror found in /etc/apt/sources.list or /etc/apt/sources.list.d/ \
         (set {MIRROR_ENV}, e.g. http://deb.debian.org/debian)"
    )
}

/// `deb [options] URI SUITE COMPONENTS...` lines.
fn mirror_in_one_line(text: &str) -> Option<String> {
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default();
        let mut words = line.split_whitespace();
        if words.next() != Some("deb") {
            continue;
        }
        let mut rest: Vec<&str> = words.collect();
        if rest.first().is_some_and(|w| w.starts_with('[')) {
            let end = rest.iter().position(|w| w.ends_with(']'))?;
            rest.drain(..=end);
        }
        if let [uri, suite, ..] = rest.as_slice() {
            if *suite == SUITE {
                return Some(uri.to_string());
            }
        }
    }
    None
}

/// deb822 stanzas (`Types:`, `URIs:`, `Suites:`), as in `debian.sources`.
fn mirror_in_deb822(text: &str) -> Option<String> {
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().filter(|l| !l.trim_start().starts_with('#')).find_map(|l| {
                let (key, value) = l.split_once(':')?;
                key.trim().eq_ignore_ascii_case(name).then(|| value.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            })
        };
        let types = field("Types").unwrap_or_default();
        let suites = field("Suites").unwrap_or_default();
        let enabled = field("Enabled").is_none_or(|v| v.first().is_none_or(|v| v != "no"));
        if enabled && types.iter().any(|t| t == "deb") && suites.iter().any(|s| s == SUITE) {
            if let Some(uri) = field("URIs").and_then(|uris| uris.into_iter().next()) {
                return Some(uri);
            }
        }
    }
    None
}

fn docker_reachable() -> Result<()> {
    let output = Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]).output().context("running the docker CLI (is docker installed?)")?;
    if !output.status.success() {
        bail!("the docker engine is not reachable (start it, e.g. `service docker start`): {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

/// Whether the local Docker engine has `image`.
pub fn image_exists(image: &str) -> bool {
    Command::new("docker").args(["image", "inspect", image]).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// Run a command; its stdout, or an error with the end of its output.
fn run(command: &mut Command, what: &str) -> Result<String> {
    let output = command.output().with_context(|| format!("starting {what}"))?;
    if !output.status.success() {
        let tail = |bytes: &[u8]| {
            let text = String::from_utf8_lossy(bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(20)..].join("\n")
        };
        bail!("{what} failed ({}):\n{}\n{}", output.status, tail(&output.stdout), tail(&output.stderr));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn clear_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_from_both_source_formats() {
        let deb822 = "Types: deb\n# comment\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n\
                      Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n";
        assert_eq!(mirror_in_deb822(deb822).as_deref(), Some("http://deb.debian.org/debian"));
        let disabled = "Enabled: no\nTypes: deb\nURIs: http://a/debian\nSuites: bookworm\n";
        assert_eq!(mirror_in_deb822(disabled), None);
        let one_line = "# deb http://old/debian bookworm main\ndeb [arch=amd64 signed-by=/k.gpg] http://m/debian bookworm main\n";
        assert_eq!(mirror_in_one_line(one_line).as_deref(), Some("http://m/debian"));
        assert_eq!(mirror_in_one_line("deb http://m/debian bullseye main\n"), None);
    }
}
