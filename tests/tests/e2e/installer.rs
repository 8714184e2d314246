//! The agent installer end to end: the hub serves `install.sh` and agent builds, and the
//! script runs for real (`curl -fsSL HUB/install.sh | sh -s -- ...`, as root) inside a
//! Debian container built on this machine (debootstrap, no registry) that shares the host
//! network, so it reaches the test hub on 127.0.0.1. One container runs a real systemd as its
//! init (no extra privileges needed) for the systemd path; the others run the script's
//! `--no-systemd` path; the unit is also checked with `systemd-analyze verify`. shellcheck
//! lints the script. Failures are provoked the way they happen on a customer's machine: a
//! plan too big for the host, programs on PATH that report another architecture or clock,
//! tokens naming an address nobody answers on or another hub's CA, a build that does not
//! match its SHA256SUMS, a hub that is gone, a read-only /usr/local/bin.
//!
//! Needs docker, debootstrap (for the base image), shellcheck and systemd-analyze; a missing
//! one fails the test with what to install.

#![allow(clippy::unwrap_used)]

use gantry_hub::install::InstallerConfig;
use gantry_tests::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = "/usr/local/bin/gantry-agent";

/// The build file name for this machine (the container shares its architecture).
fn build_file() -> String {
    format!("gantry-agent-linux-{}", std::env::consts::ARCH)
}

fn require(tool: &str, package: &str) {
    let found = Command::new("sh").args(["-c", &format!("command -v {tool} || test -x /usr/sbin/{tool}")]).output().is_ok_and(|o| o.status.success());
    assert!(found, "{tool} is not installed; tests/installer.rs needs it (apt-get install -y {package}; .ci/run does)");
}

/// A Debian container on the host network, removed when dropped.
struct Container {
    id: String,
}

impl Container {
    fn start() -> Container {
        Container::start_with(&[])
    }

    /// A container with more `docker run` arguments (mounts).
    fn start_with(extra: &[&str]) -> Container {
        require("docker", "docker.io");
        let image = gantry_tests::images::debian_base_image().expect("building the Debian base image");
        let name = format!("gantry-installer-{:08x}", rand::random::<u32>());
        let output = Command::new("docker")
            .args(["run", "-d", "--rm", "--init", "--network", "host", "--name", &name])
            .args(extra)
            .args([image.as_str(), "sleep", "infinity"])
            .output()
            .expect("docker run");
        assert!(output.status.success(), "docker run: {}", String::from_utf8_lossy(&output.stderr));
        Container { id: name }
    }

    /// A container whose init is a real systemd, once systemd reports the system up.
    async fn start_systemd() -> Container {
        require("docker", "docker.io");
        let image = gantry_tests::images::debian_systemd_image().expect("building the Debian systemd image");
        let name = format!("gantry-installer-systemd-{:08x}", rand::random::<u32>());
        let output = Command::new("docker")
            .args(["run", "-d", "--rm", "--network", "host", "--name", &name, "--tmpfs", "/run", "--tmpfs", "/run/lock"])
            .args(["-v", "/sys/fs/cgroup:/sys/fs/cgroup:ro", &image, "/lib/systemd/systemd"])
            .output()
            .expect("docker run");
        assert!(output.status.success(), "docker run: {}", String::from_utf8_lossy(&output.stderr));
        let container = Container { id: name };
        let state = wait_for(Duration::from_secs(60), "systemd up in the container", || async {
            let (_, out) = container.sh("systemctl is-system-running 2>/dev/null").await;
            let state = out.trim().to_string();
            (state == "running" || state == "degraded").then_some(state)
        })
        .await;
        eprintln!("systemd in the container: {state}");
        container
    }

    /// A property of the agent's unit, as `systemctl show` reports it.
    async fn unit_property(&self, name: &str) -> String {
        let (code, out) = self.sh(&format!("systemctl show -p {name} --value gantry-agent")).await;
        assert_eq!(code, 0, "{out}");
        out.trim().to_string()
    }

    /// `sh -c script` in the container as `user`: exit code and stdout + stderr.
    async fn sh_as(&self, user: &str, script: &str) -> (i32, String) {
        let output = tokio::process::Command::new("docker").args(["exec", "-u", user, &self.id, "sh", "-c", script]).output().await.expect("docker exec");
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        (output.status.code().unwrap_or(-1), text)
    }

    async fn sh(&self, script: &str) -> (i32, String) {
        self.sh_as("root", script).await
    }

    /// The install script as users run it: fetched from the hub and piped into sh.
    async fn install(&self, hub: &TestHub, args: &str) -> (i32, String) {
        self.install_with(hub, "", args).await
    }

    /// As [`Container::install`], with `env` (`NAME=value ...`) set for the shell that runs
    /// the script.
    async fn install_with(&self, hub: &TestHub, env: &str, args: &str) -> (i32, String) {
        let (code, output) = self.sh(&format!("curl -fsSL http://{}/install.sh | {env} sh -s -- {args}", hub.http)).await;
        eprintln!("---- {env} install.sh {args}\n{output}---- exit {code}");
        (code, output)
    }

    /// `script` (as some hub serves it) piped into `sh -s -- args`.
    async fn run_script(&self, script: &str, args: &str) -> (i32, String) {
        use tokio::io::AsyncWriteExt;
        let mut child = tokio::process::Command::new("docker")
            .args(["exec", "-i", &self.id, "sh", "-c", &format!("sh -s -- {args}")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("docker exec");
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(script.as_bytes()).await.unwrap();
        drop(stdin);
        let output = child.wait_with_output().await.unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        let code = output.status.code().unwrap_or(-1);
        eprintln!("---- install.sh (piped) {args}\n{text}---- exit {code}");
        (code, text)
    }

    /// An executable `path` in the container with `text` as its content.
    async fn write_program(&self, path: &str, text: &str) {
        let (code, out) = self.sh(&format!("mkdir -p \"$(dirname {path})\" && cat > {path} <<'PROGRAM'\n{text}PROGRAM\nchmod 0755 {path}")).await;
        assert_eq!(code, 0, "{out}");
    }

    async fn exists(&self, path: &str) -> bool {
        self.sh(&format!("test -e {path}")).await.0 == 0
    }

    async fn sha256(&self, path: &str) -> String {
        let (code, out) = self.sh(&format!("sha256sum {path} | cut -d' ' -f1")).await;
        assert_eq!(code, 0, "{out}");
        out.trim().to_string()
    }

    /// The pid of the background agent, if its pid file names a live process.
    async fn agent_pid(&self) -> Option<String> {
        let (code, out) = self.sh("pid=$(cat /run/gantry-agent.pid) && kill -0 \"$pid\" && echo \"$pid\"").await;
        (code == 0).then(|| out.trim().to_string())
    }

    /// Nothing of the agent is on the machine.
    async fn assert_nothing_installed(&self, after: &str) {
        for path in [BIN, "/etc/gantry", "/var/lib/gantry-agent", "/run/gantry-agent.pid", "/etc/systemd/system/gantry-agent.service"] {
            assert!(!self.exists(path).await, "{path} exists after {after}");
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.id]).output();
    }
}

fn sha256_hex(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_string()
}

/// Put an agent build of `version` into the downloads folder. A later "release" is the same
/// program with a build marker appended (still a valid executable, with another checksum),
/// as a rebuilt binary would differ.
fn add_build(downloads: &Path, version: &str) -> PathBuf {
    let dir = downloads.join(version);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(build_file());
    let mut bytes = std::fs::read(agent_binary()).unwrap();
    bytes.extend_from_slice(format!("\0gantry-test-build {version}\0").as_bytes());
    std::fs::write(&path, bytes).unwrap();
    std::fs::write(dir.join("SHA256SUMS"), format!("{}  {}\n", sha256_hex(&path), build_file())).unwrap();
    path
}

async fn start_hub(dir: &Path, downloads: &Path) -> TestHub {
    let downloads = downloads.to_path_buf();
    TestHub::start(&dir.join("hub"), move |config| {
        config.installer = InstallerConfig { downloads_dir: Some(downloads), serve_own_agent: false, ..InstallerConfig::default() };
    })
    .await
}

async fn org_agents(hub: &TestHub, org: &str) -> Vec<Value> {
    let (status, body) = hub.api().get(&format!("/api/v1/orgs/{org}/agents")).await;
    assert_eq!(status, 200, "{body}");
    body["agents"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_rerun_upgrade_uninstall_and_purge_in_a_container() {
    let dir = TempDir::new("installer-lifecycle");
    let downloads = dir.path().join("downloads");
    let first = add_build(&downloads, "0.1.0");
    let hub = start_hub(dir.path(), &downloads).await;
    hub.create_org("acme", 5).await;
    let token = hub.token("acme", 1, "1h").await;
    let container = Container::start();

    // Dry run: every check passes, the build is downloaded and verified and the hub answers
    // over QUIC, and nothing is changed.
    let (code, out) = container.install(&hub, &format!("--token {token} --no-systemd --dry-run")).await;
    assert_eq!(code, 0, "{out}");
    for row in ["root      ok", "os/arch   ok", "hub       ok", "token     ok", "memory    ok", "clock     ok", "download  ok", "quic      ok"] {
        assert!(out.contains(row), "dry run lacks {row:?}:\n{out}");
    }
    assert!(out.contains("docker    WARN") && out.contains("deployments are disabled"), "{out}");
    assert!(out.contains("Nothing was changed"), "{out}");
    container.assert_nothing_installed("a dry run").await;
    assert!(org_agents(&hub, "acme").await.is_empty(), "a dry run enrolled an agent");

    // Install: enrolled with the requested label, running, and online at the hub.
    let (code, out) = container.install(&hub, &format!("--token {token} --no-systemd --label role=web")).await;
    assert_eq!(code, 0, "{out}");
    let agents = org_agents(&hub, "acme").await;
    assert_eq!(agents.len(), 1, "{agents:?}");
    let id = agents[0]["id"].as_str().unwrap().to_string();
    assert!(out.contains(&format!("Done: agent {id} is online")), "{out}");
    let agent = hub.wait_status(&id, "online", Duration::from_secs(30)).await;
    assert_eq!(agent["labels"]["role"], "web", "{agent}");
    assert_eq!(container.sha256(BIN).await, sha256_hex(&first));
    let (code, config) = container.sh("cat /etc/gantry/agent.toml").await;
    assert!(code == 0 && config.contains("state_dir = \"/var/lib/gantry-agent\""), "{config}");
    let pid = container.agent_pid().await.expect("the agent runs in the background");

    // Re-run: nothing changes, the same process keeps running; a used-up token is fine for
    // a machine that is already enrolled.
    let (code, out) = container.install(&hub, &format!("--token {token} --no-systemd")).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("nothing to change") && out.contains("already enrolled as"), "{out}");
    assert_eq!(container.agent_pid().await.as_deref(), Some(pid.as_str()), "a re-run restarted the agent");
    assert_eq!(org_agents(&hub, "acme").await.len(), 1);

    // Re-run without a token: the agent's certificate identifies the machine. A --label
    // is not applied and the run says so, and how labels are changed.
    let (code, out) = container.install(&hub, "--no-systemd --label role=db").await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("agent     ok     this machine is enrolled as {id} (no token needed)")), "{out}");
    assert!(out.contains("quic      skip") && out.contains("nothing to change"), "{out}");
    assert!(out.contains("--label not applied: labels are set at enrollment") && out.contains("run the installer with\n            --purge"), "{out}");
    assert_eq!(container.agent_pid().await.as_deref(), Some(pid.as_str()), "a re-run restarted the agent");
    assert_eq!(hub.agent(&id).await["labels"]["role"], "web");

    // Upgrade: the hub has a newer build; the re-run (no token needed) installs it and
    // restarts the agent, which comes back online as the same agent.
    let second = add_build(&downloads, "0.2.0");
    let (code, out) = container.install(&hub, "--no-systemd").await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("upgraded /usr/local/bin/gantry-agent from 0.1.0 to 0.2.0"), "{out}");
    assert_eq!(container.sha256(BIN).await, sha256_hex(&second));
    let new_pid = container.agent_pid().await.expect("the upgraded agent runs");
    assert_ne!(new_pid, pid, "the agent was not restarted on the new binary");
    hub.wait_status(&id, "online", Duration::from_secs(30)).await;
    assert_eq!(org_agents(&hub, "acme").await.len(), 1);

    // Uninstall: process, binary and pid file gone; identity kept; the hub sees it offline.
    let (code, out) = container.install(&hub, "--uninstall").await;
    assert_eq!(code, 0, "{out}");
    assert!(!container.exists(BIN).await && !container.exists("/run/gantry-agent.pid").await, "{out}");
    assert!(container.sh(&format!("kill -0 {new_pid}")).await.0 != 0, "the agent still runs after --uninstall");
    assert!(container.exists("/var/lib/gantry-agent/identity.json").await && container.exists("/etc/gantry/agent.toml").await);
    hub.wait_status(&id, "offline", Duration::from_secs(30)).await;

    // Installing again reuses the identity (no token needed); then purge revokes it at the
    // hub and removes all.
    let (code, out) = container.install(&hub, "--no-systemd").await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("already enrolled as {id}")) && out.contains("installed /usr/local/bin/gantry-agent (0.2.0)"), "{out}");
    hub.wait_status(&id, "online", Duration::from_secs(30)).await;
    let (code, out) = container.install(&hub, "--purge").await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("revoked agent {id}")), "{out}");
    hub.wait_status(&id, "revoked", Duration::from_secs(10)).await;
    container.assert_nothing_installed("--purge").await;
    let (code, out) = container.install(&hub, "--purge").await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("nothing to uninstall"), "{out}");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_under_systemd_restarts_a_killed_agent_and_uninstalls_cleanly() {
    let dir = TempDir::new("installer-systemd");
    let downloads = dir.path().join("downloads");
    add_build(&downloads, "0.1.0");
    let hub = start_hub(dir.path(), &downloads).await;
    hub.create_org("acme", 5).await;
    let token = hub.token("acme", 1, "1h").await;
    let container = Container::start_systemd().await;

    // Install: the preflight sees systemd, the agent runs as a hardened, enabled unit and is
    // online at the hub.
    let (code, out) = container.install(&hub, &format!("--token {token}")).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("systemd   ok") && out.contains("wrote /etc/systemd/system/gantry-agent.service"), "{out}");
    assert!(out.contains("Logs: journalctl -u gantry-agent -f"), "{out}");
    let agents = org_agents(&hub, "acme").await;
    assert_eq!(agents.len(), 1, "{agents:?}");
    let id = agents[0]["id"].as_str().unwrap().to_string();
    assert!(out.contains(&format!("Done: agent {id} is online")), "{out}");
    hub.wait_status(&id, "online", Duration::from_secs(30)).await;
    assert_eq!(container.unit_property("ActiveState").await, "active");
    assert_eq!(container.unit_property("UnitFileState").await, "enabled");
    assert_eq!(container.unit_property("NoNewPrivileges").await, "yes");
    assert_eq!(container.unit_property("ProtectSystem").await, "strict");
    assert_eq!(container.unit_property("Restart").await, "always");
    assert!(!container.exists("/run/gantry-agent.pid").await, "no background process under systemd");
    let pid = container.unit_property("MainPID").await;
    assert_ne!(pid, "0");

    // The agent killed with SIGKILL: systemd starts it again and it comes back online.
    let (code, out) = container.sh(&format!("kill -9 {pid}")).await;
    assert_eq!(code, 0, "{out}");
    let restarted = wait_for(Duration::from_secs(30), "systemd restarts the killed agent", || async {
        let now = container.unit_property("MainPID").await;
        (now != "0" && now != pid && container.unit_property("ActiveState").await == "active").then_some(now)
    })
    .await;
    hub.wait_status(&id, "online", Duration::from_secs(30)).await;

    // Re-run: nothing to change, the unit keeps its process.
    let (code, out) = container.install(&hub, &format!("--token {token}")).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("gantry-agent.service already running") && out.contains("nothing to change"), "{out}");
    assert_eq!(container.unit_property("MainPID").await, restarted);
    assert_eq!(org_agents(&hub, "acme").await.len(), 1);

    // Uninstall stops and removes the unit; purge revokes the agent and removes the rest.
    let (code, out) = container.install(&hub, "--uninstall").await;
    assert_eq!(code, 0, "{out}");
    assert!(!container.exists("/etc/systemd/system/gantry-agent.service").await && !container.exists(BIN).await, "{out}");
    let (_, state) = container.sh("systemctl is-active gantry-agent").await;
    assert_ne!(state.trim(), "active", "the agent still runs after --uninstall");
    hub.wait_status(&id, "offline", Duration::from_secs(30)).await;
    // A purge after the binary is gone fetches the hub's build, checks it against
    // SHA256SUMS, signs the revocation with it and deletes it again.
    let (code, out) = container.install(&hub, "--purge").await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("fetching gantry-agent from") && out.contains("sha256 verified"), "{out}");
    assert!(out.contains(&format!("revoked agent {id}")), "{out}");
    hub.wait_status(&id, "revoked", Duration::from_secs(10)).await;
    container.assert_nothing_installed("--purge").await;
    let (_, left) = container.sh("find / -xdev -name 'gantry-agent*' -type f").await;
    assert_eq!(left.trim(), "", "the copy that signed the revocation was left behind");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_systemd_the_unit_may_write_a_chosen_state_dir_and_a_rerun_upgrades_without_a_token() {
    let dir = TempDir::new("installer-systemd-state");
    let downloads = dir.path().join("downloads");
    add_build(&downloads, "0.1.0");
    let hub = start_hub(dir.path(), &downloads).await;
    hub.create_org("acme", 5).await;
    let token = hub.token("acme", 1, "1h").await;
    let container = Container::start_systemd().await;

    // A state directory of the user's choosing: the config names it and the unit lets the
    // agent write there (and not in the default one, which is not created).
    let state = "/srv/gantry/state";
    let (code, out) = container.install(&hub, &format!("--token {token} --state-dir {state}")).await;
    assert_eq!(code, 0, "{out}");
    let agents = org_agents(&hub, "acme").await;
    assert_eq!(agents.len(), 1, "{agents:?}");
    let id = agents[0]["id"].as_str().unwrap().to_string();
    assert!(out.contains(&format!("Done: agent {id} is online")), "{out}");
    assert_eq!(container.unit_property("ReadWritePaths").await, state);
    assert_eq!(container.unit_property("ActiveState").await, "active");
    assert!(container.exists(&format!("{state}/identity.json")).await);
    assert!(!container.exists("/var/lib/gantry-agent").await, "the default state directory was created too");
    let (code, config) = container.sh("cat /etc/gantry/agent.toml").await;
    assert!(code == 0 && config.contains(&format!("state_dir = \"{state}\"")), "{config}");
    let pid = container.unit_property("MainPID").await;

    // Upgrade without a token: the binary is replaced, the unit restarted, and the same agent
    // comes back online. The --label given is not applied, and the run says so.
    let second = add_build(&downloads, "0.2.0");
    let (code, out) = container.install(&hub, "--label role=db").await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("upgraded /usr/local/bin/gantry-agent from 0.1.0 to 0.2.0") && out.contains("(re)started gantry-agent.service"), "{out}");
    assert!(out.contains("--label not applied: labels are set at enrollment"), "{out}");
    assert_eq!(container.sha256(BIN).await, sha256_hex(&second));
    let restarted = container.unit_property("MainPID").await;
    assert!(restarted != "0" && restarted != pid, "the unit was not restarted: {pid} -> {restarted}");
    let agent = hub.wait_status(&id, "online", Duration::from_secs(30)).await;
    assert!(agent["labels"].get("role").is_none(), "{agent}");
    assert_eq!(org_agents(&hub, "acme").await.len(), 1);
    assert_eq!(container.unit_property("ReadWritePaths").await, state);

    // Another state directory on a re-run is refused before anything changes.
    let (code, out) = container.install(&hub, "--state-dir /elsewhere").await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains(&format!("--state-dir /elsewhere differs from state_dir = \"{state}\" in /etc/gantry/agent.toml")), "{out}");
    assert_eq!(container.unit_property("MainPID").await, restarted);

    // Purge finds the state where the config says and removes it.
    let (code, out) = container.install(&hub, "--purge").await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("revoked agent {id}")) && out.contains(&format!("removed {state}")), "{out}");
    hub.wait_status(&id, "revoked", Duration::from_secs(10)).await;
    assert!(!container.exists(state).await);
    container.assert_nothing_installed("--purge").await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_preflight_shows_the_fix_and_changes_nothing() {
    let dir = TempDir::new("installer-preflight");
    let downloads = dir.path().join("downloads");
    add_build(&downloads, "0.1.0");
    let hub = start_hub(dir.path(), &downloads).await;
    hub.create_org("acme", 5).await;
    let api = hub.api();
    // A plan for big machines only: the preflight compares the host against it.
    let plan = json!({ "id": "huge", "name": "Huge hosts", "prices": { "currency": "EUR", "base_minor": 0, "meters": [] },
        "limits": { "agent_host": { "min_cpus": 100_000, "min_memory_mib": 1_000_000_000u64, "min_disk_mib": 1_000_000_000u64 } } });
    let (status, body) = api.post("/api/v1/plans", &plan).await;
    assert_eq!(status, 201, "{body}");
    let (status, _, body) = api.send("PUT", "/api/v1/orgs/acme/subscription", Some("application/json"), br#"{"plan":"huge"}"#.to_vec()).await;
    assert_eq!(status, 200, "{body}");
    let token = hub.token("acme", 1, "1h").await;
    let container = Container::start();

    let (code, out) = container.install(&hub, &format!("--token {token} --no-systemd")).await;
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("memory    FAIL") && out.contains("plan huge needs 1000000000 MiB"), "{out}");
    assert!(out.contains("fix:   use a machine with at least 1000000000 MiB of memory"), "{out}");
    assert!(out.contains("cpu       FAIL") && out.contains("CPUs, plan huge needs 100000"), "{out}");
    assert!(out.contains("fix:   use a machine with at least 100000 CPUs"), "{out}");
    assert!(out.contains("disk      FAIL") && out.contains("MiB free in /var/lib, plan huge needs 1000000000 MiB"), "{out}");
    assert!(out.contains("fix:   free at least 1000000000 MiB in /var/lib"), "{out}");
    assert!(out.contains("clock     ok") && out.contains("quic      ok"), "other checks still run: {out}");
    assert!(out.contains("preflight failed; nothing was changed"), "{out}");
    container.assert_nothing_installed("a failed preflight").await;

    // Without systemd and without --no-systemd: a failure that says what to do instead.
    let (code, out) = container.install(&hub, &format!("--token {token}")).await;
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("systemd   FAIL") && out.contains("re-run with --no-systemd"), "{out}");

    // Not root.
    let (code, out) = container.sh_as("65534", &format!("curl -fsSL http://{}/install.sh | sh -s -- --token {token} --no-systemd --dry-run", hub.http)).await;
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("root      FAIL") && out.contains("run the installer as root"), "{out}");
    container.assert_nothing_installed("a run as nobody").await;
    assert!(org_agents(&hub, "acme").await.is_empty(), "a failed preflight enrolled an agent");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_fails_on_a_foreign_platform_a_skewed_clock_and_an_unreachable_or_foreign_hub() {
    let dir = TempDir::new("installer-preflight-host");
    let downloads = dir.path().join("downloads");
    add_build(&downloads, "0.1.0");
    let hub = start_hub(dir.path(), &downloads).await;
    hub.create_org("acme", 5).await;
    let token = hub.token("acme", 1, "1h").await;
    // The host's Docker engine, where the agent looks for it.
    let container = Container::start_with(&["-v", "/run/docker.sock:/var/run/docker.sock"]);
    let dry_run = format!("--token {token} --no-systemd --dry-run");

    // With a Docker engine the docker row passes.
    let (code, out) = container.install(&hub, &dry_run).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("docker    ok     socket /var/run/docker.sock answers") && !out.contains("WARN"), "{out}");

    // An architecture no build exists for (uname as a RISC-V machine reports it).
    container.write_program("/opt/riscv/uname", "#!/bin/sh\ncase \"$1\" in -m) echo riscv64 ;; *) exec /usr/bin/uname \"$@\" ;; esac\n").await;
    let (code, out) = container.install_with(&hub, "PATH=/opt/riscv:$PATH", &dry_run).await;
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("os/arch   FAIL   Linux riscv64 is not supported") && out.contains("fix:   use Linux on x86_64 or aarch64"), "{out}");
    assert!(out.contains("build     FAIL   the hub has no gantry-agent-linux-riscv64"), "{out}");

    // A clock an hour ahead of the hub's.
    container
        .write_program("/opt/ahead/date", "#!/bin/sh\nif [ \"$1\" = +%s ]; then echo $(($(/usr/bin/date +%s) + 3600)); else exec /usr/bin/date \"$@\"; fi\n")
        .await;
    let (code, out) = container.install_with(&hub, "PATH=/opt/ahead:$PATH", &dry_run).await;
    assert_eq!(code, 3, "{out}");
    let clock = out.lines().find(|l| l.contains("clock     FAIL")).unwrap_or_else(|| panic!("no clock failure:\n{out}"));
    let skew: i64 = clock.split_whitespace().nth(2).and_then(|w| w.strip_suffix('s')).unwrap().parse().unwrap();
    assert!((3590..=3610).contains(&skew), "{clock}");
    assert!(clock.contains("off the hub's clock; certificates would not be accepted"), "{clock}");
    assert!(out.contains("fix:   sync the clock: timedatectl set-ntp true"), "{out}");

    // The QUIC port unreachable: the token names an address where nothing answers UDP.
    let mut parsed = gantry_shared::token::EnrollmentToken::parse(&token).unwrap();
    parsed.hub_addr = free_udp_addr().to_string();
    let (code, out) = container.install(&hub, &format!("--token {} --no-systemd --dry-run", parsed.encode())).await;
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("quic      FAIL") && out.contains("fix:   allow outbound UDP to"), "{out}");

    // Something else answers there: a hub with another CA than the one the token pins.
    let mut parsed = gantry_shared::token::EnrollmentToken::parse(&token).unwrap();
    parsed.ca_sha256 = [7; 32];
    let (code, out) = container.install(&hub, &format!("--token {} --no-systemd --dry-run", parsed.encode())).await;
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("quic      FAIL") && out.contains("is not the one that issued this token"), "{out}");

    container.assert_nothing_installed("failed preflights").await;
    assert!(org_agents(&hub, "acme").await.is_empty(), "a preflight enrolled an agent");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_checksum_hub_gone_agent_never_online_and_failed_command_exit_with_their_codes() {
    let dir = TempDir::new("installer-exits");
    let downloads = dir.path().join("downloads");
    add_build(&downloads, "0.1.0");
    let sums = downloads.join("0.1.0").join("SHA256SUMS");
    let good_sums = std::fs::read_to_string(&sums).unwrap();
    let hub = start_hub(dir.path(), &downloads).await;
    hub.create_org("acme", 5).await;
    let token = hub.token("acme", 2, "1h").await;
    let container = Container::start();
    let args = format!("--token {token} --no-systemd");

    // The build does not match its SHA256SUMS: exit 5, nothing installed.
    let zeros = "0".repeat(64);
    std::fs::write(&sums, format!("{zeros}  {}\n", build_file())).unwrap();
    let (code, out) = container.install(&hub, &args).await;
    assert_eq!(code, 5, "{out}");
    assert!(out.contains("download  FAIL") && out.contains(&format!("checksum mismatch for {}", build_file())), "{out}");
    assert!(out.contains(&format!("SHA256SUMS says {zeros}")) && out.contains("the download is being altered on the way"), "{out}");
    assert!(out.contains("preflight failed; nothing was changed"), "{out}");
    container.assert_nothing_installed("a checksum mismatch").await;
    std::fs::write(&sums, good_sums).unwrap();

    // The script of a hub that no longer answers: exit 5, nothing installed.
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (code, out) = container.run_script(&gantry_installer::render_script(&format!("http://{gone}")), &args).await;
    assert_eq!(code, 5, "{out}");
    assert!(out.contains(&format!("hub       FAIL   cannot reach http://{gone}")) && out.contains("the hub's HTTP port must be reachable from here"), "{out}");
    container.assert_nothing_installed("an unreachable hub").await;
    assert!(org_agents(&hub, "acme").await.is_empty());

    // Installed and started, but the agent cannot reach the hub's QUIC port (the kept
    // config sends it to an address where nothing answers): exit 6 once --timeout is up.
    let quiet = free_udp_addr();
    let (code, out) = container.sh(&format!("mkdir -p /etc/gantry && echo 'hub_addr = \"{quiet}\"' > /etc/gantry/agent.toml")).await;
    assert_eq!(code, 0, "{out}");
    let (code, out) = container.install(&hub, &format!("{args} --timeout 3")).await;
    assert_eq!(code, 6, "{out}");
    assert!(out.contains("config    kept /etc/gantry/agent.toml"), "{out}");
    assert!(out.contains("the agent is installed and started, but the hub still shows it offline after 3s; see: tail /var/log/gantry-agent.log"), "{out}");
    let agents = org_agents(&hub, "acme").await;
    assert_eq!(agents.len(), 1, "{agents:?}");
    assert_eq!(hub.agent(agents[0]["id"].as_str().unwrap()).await["status"], "offline");
    assert!(container.agent_pid().await.is_some(), "the agent is left running, to connect once it can");

    // A system command fails (/usr/local/bin is read-only): exit 1 naming it, nothing
    // installed and nothing enrolled.
    let empty = dir.path().join("empty-bin");
    std::fs::create_dir_all(&empty).unwrap();
    let readonly = Container::start_with(&["-v", &format!("{}:/usr/local/bin:ro", empty.display())]);
    let (code, out) = readonly.install(&hub, &args).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("error: could not install /usr/local/bin/gantry-agent") && out.contains("Read-only file system"), "{out}");
    readonly.assert_nothing_installed("a failed install").await;
    assert_eq!(org_agents(&hub, "acme").await.len(), 1);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_message_and_an_exit_code() {
    let dir = TempDir::new("installer-input");
    let downloads = dir.path().join("downloads");
    add_build(&downloads, "0.1.0");
    let hub = start_hub(dir.path(), &downloads).await;
    hub.create_org("acme", 5).await;
    let token = hub.token("acme", 1, "1h").await;
    let container = Container::start();

    let cases: Vec<(String, i32, &str)> = vec![
        ("--token x --frobnicate".into(), 2, "unknown option: --frobnicate"),
        ("--no-systemd".into(), 2, "missing --token"),
        ("--token".into(), 2, "--token needs a value"),
        (format!("--token {token} --label novalue"), 2, "label 'novalue' must be KEY=VALUE"),
        (format!("--token {token} --timeout soon"), 2, "--timeout must be a whole number of seconds"),
        (format!("--token {token} --label 'bad key=x'"), 2, "label key 'bad key' must be"),
        (format!("--token {token} --label role={}", "x".repeat(64)), 2, "label value for 'role' is longer than 63 characters"),
        (format!("--token {token} --state-dir relative/dir"), 2, "state directory 'relative/dir' must be an absolute path below /"),
        (format!("--token {token} --state-dir '/srv/my state'"), 2, "state directory '/srv/my state' must be a plain absolute path"),
        ("--token gt1_notatoken --no-systemd".into(), 4, "enrollment token is not valid base64url"),
        ("--token hello --no-systemd".into(), 4, "enrollment token must start with `gt1_`"),
    ];
    for (args, expected, message) in &cases {
        let (code, out) = container.install(&hub, args).await;
        assert_eq!(code, *expected, "{args}: {out}");
        assert!(out.contains(message), "{args}: expected {message:?} in:\n{out}");
    }
    // A well-formed token whose secret is wrong.
    let forged = {
        let mut parsed = gantry_shared::token::EnrollmentToken::parse(&token).unwrap();
        parsed.secret = "0".repeat(64);
        parsed.encode()
    };
    let (code, out) = container.install(&hub, &format!("--token {forged} --no-systemd")).await;
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("token     FAIL") && out.contains("unknown or its secret does not match"), "{out}");
    container.assert_nothing_installed("bad input").await;
    assert!(org_agents(&hub, "acme").await.is_empty());

    // The documented codes are what --help lists.
    let (code, out) = container.install(&hub, "--help").await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("2  usage error") && out.contains("3  preflight failed") && out.contains("6  installed and started"), "{out}");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_are_served_with_checksums_and_bad_paths_are_refused() {
    let dir = TempDir::new("installer-downloads");
    let downloads = dir.path().join("downloads");
    let build = add_build(&downloads, "0.1.0");
    let hub = start_hub(dir.path(), &downloads).await;
    let api = hub.api().anonymous();
    let (status, _, sums) = api.send("GET", "/downloads/0.1.0/SHA256SUMS", None, vec![]).await;
    assert_eq!(status, 200, "{sums}");
    assert_eq!(sums, format!("{}  {}\n", sha256_hex(&build), build_file()));
    for bad in ["/downloads/0.1.0/gantry-agent-linux-sparc", "/downloads/9.9.9/SHA256SUMS", "/downloads/..%2F..%2Fetc/passwd", "/downloads/0.1.0/..%2Fhub"] {
        let (status, _, body) = api.send("GET", bad, None, vec![]).await;
        assert_eq!(status, 404, "{bad}: {body}");
        assert!(body.contains("\"not_found\""), "{bad}: {body}");
    }
    // Unknown and wrong tokens are refused with the API's error shape.
    let (status, body) = api.post("/api/v1/install/check", &json!({ "token": "gt1_AAAA" })).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_token");
    let (status, body) = api.post("/api/v1/install/check", &json!({ "token": 5 })).await;
    assert_eq!(status, 400, "{body}");
    let (status, _, body) = api.send("GET", "/api/v1/install/agents/agt_1", None, vec![]).await;
    assert_eq!(status, 401, "{body}");
    hub.stop().await;
}

#[tokio::test]
async fn the_script_passes_shellcheck_as_kept_and_as_served() {
    require("shellcheck", "shellcheck");
    let dir = TempDir::new("installer-shellcheck");
    let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("../installer/install.sh");
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    let (status, headers, served) = hub.api().anonymous().send("GET", "/install.sh", None, vec![]).await;
    assert_eq!(status, 200);
    assert!(headers["content-type"].to_str().unwrap().starts_with("text/x-shellscript"));
    assert!(served.contains(&format!("HUB_URL='http://{}'", hub.http)), "the hub's URL is filled in");
    assert!(served.contains("NoNewPrivileges=yes"), "the systemd unit is filled in");
    let served_path = dir.path().join("install.sh");
    std::fs::write(&served_path, &served).unwrap();
    for path in [template.as_path(), served_path.as_path()] {
        let out = Command::new("shellcheck").args(["-s", "sh", "-S", "style"]).arg(path).output().unwrap();
        assert!(out.status.success(), "shellcheck {}:\n{}", path.display(), String::from_utf8_lossy(&out.stdout));
    }
    hub.stop().await;
}

#[test]
fn the_systemd_unit_verifies() {
    require("systemd-analyze", "systemd");
    // A root with the host's own units (for the targets the unit names) and an agent program
    // where the unit expects it.
    let dir = TempDir::new("installer-unit");
    let root = dir.path();
    std::fs::create_dir_all(root.join("usr/lib/systemd")).unwrap();
    let copy = Command::new("cp").args(["-r", "/usr/lib/systemd/system"]).arg(root.join("usr/lib/systemd/")).output().unwrap();
    assert!(copy.status.success(), "{}", String::from_utf8_lossy(&copy.stderr));
    std::fs::create_dir_all(root.join("usr/local/bin")).unwrap();
    std::fs::copy(agent_binary(), root.join("usr/local/bin/gantry-agent")).unwrap();
    std::fs::create_dir_all(root.join("etc/systemd/system")).unwrap();
    std::fs::write(root.join("etc/systemd/system/gantry-agent.service"), gantry_installer::AGENT_SYSTEMD_UNIT).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg("/etc/systemd/system/gantry-agent.service")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.trim().is_empty(), "systemd-analyze verify:\n{text}");
}

#[tokio::test]
async fn deregistration_needs_the_agents_own_key_and_a_fresh_signature() {
    let dir = TempDir::new("installer-deregister");
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    hub.create_org("acme", 5).await;
    let token = hub.token("acme", 2, "1h").await;
    let (state_a, state_b) = (dir.path().join("a"), dir.path().join("b"));
    let a = enroll(&token, &state_a).await.unwrap();
    let b = enroll(&token, &state_b).await.unwrap();
    let api = hub.api().anonymous();
    let (_, request) = gantry_agent::deregister::request(&gantry_agent::state::StateDir::new(&state_a)).unwrap();
    let body = serde_json::to_value(&request).unwrap();

    // Each forgery is refused and revokes nothing: another agent's path, a signature of
    // other bytes, a stale time, and garbage.
    let mut tampered = body.clone();
    tampered["signature"] = json!(format!("{}00", &request.signature[..request.signature.len() - 2]));
    let mut stale = body.clone();
    stale["issued_at_ms"] = json!(request.issued_at_ms - 10 * 60 * 1000);
    let mut garbage = body.clone();
    garbage["certificate"] = json!("not a certificate");
    for (path, body, message) in [
        (format!("/api/v1/agents/{b}/deregister"), &body, "certificate is not the one this agent uses"),
        (format!("/api/v1/agents/{a}/deregister"), &tampered, "signature does not verify"),
        (format!("/api/v1/agents/{a}/deregister"), &stale, "away from the hub's clock"),
        (format!("/api/v1/agents/{a}/deregister"), &garbage, "certificate is not valid PEM"),
    ] {
        let (status, answer) = api.post(&path, body).await;
        assert_eq!(status, 401, "{path}: {answer}");
        assert_eq!(answer["error"]["code"], "invalid_signature", "{answer}");
        assert!(answer["error"]["message"].as_str().unwrap().contains(message), "{answer}");
    }
    let (status, answer) = api.post("/api/v1/agents/agt_nobody/deregister", &body).await;
    assert_eq!(status, 404, "{answer}");
    assert_eq!(hub.agent(&a).await["status"], "offline");
    assert_eq!(hub.agent(&b).await["status"], "offline");

    // The genuine request revokes exactly that agent, once; sending it again changes nothing.
    let (status, answer) = api.post(&format!("/api/v1/agents/{a}/deregister"), &body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "revoked");
    let (status, answer) = api.post(&format!("/api/v1/agents/{a}/deregister"), &body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(hub.agent(&b).await["status"], "offline");
    // The revoked agent can no longer connect: it stops with "needs an operator".
    let mut agent = AgentProcess::start(&state_a);
    let exit = tokio::time::timeout(Duration::from_secs(30), agent.child.wait()).await.expect("a revoked agent stops").unwrap();
    assert_eq!(exit.code(), Some(2));
    hub.stop().await;
}
