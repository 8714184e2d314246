//! The deployment artefacts in `deploy/` and `dashboards/grafana/`, checked with the tools
//! that consume them: Docker builds and runs the images (from a Debian base built locally
//! with debootstrap, nothing pulled) and an agent container comes online at a hub
//! container; docker-compose parses the Compose file; Helm's template engine renders the
//! charts; systemd-analyze verifies the hub's unit; the example configs name every option;
//! the Grafana dashboards query only metrics a running hub exports.

#![allow(clippy::unwrap_used)]

use gantry_tests::images::debian_base_image;
use gantry_tests::*;
use serde::Deserialize as _;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(workspace_root().join(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// Run a tool; its output. A missing tool fails with how to install it.
fn run(program: &str, args: &[&str], install: &str) -> Output {
    Command::new(program).args(args).output().unwrap_or_else(|e| panic!("running {program} ({e}): these tests need it ({install})"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `docker ARGS`, which must succeed; its trimmed stdout.
fn docker(args: &[&str]) -> String {
    let output = run("docker", args, "a running Docker engine");
    assert!(output.status.success(), "docker {args:?} failed: {}{}", text(&output.stdout), text(&output.stderr));
    text(&output.stdout).trim().to_string()
}

/// Docker objects removed when the test ends, pass or fail (last made, first removed).
#[derive(Debug, Default)]
struct Cleanup(Vec<(&'static str, String)>);

impl Cleanup {
    fn add(&mut self, kind: &'static str, name: &str) -> String {
        self.0.push((kind, name.to_string()));
        name.to_string()
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (kind, name) in self.0.iter().rev() {
            if *kind == "compose" {
                let _ = compose_command(&["--project-name", name, "down", "--volumes", "--timeout", "5"], &[("GANTRY_PUBLIC_ADDR", "unused:1")]).output();
                continue;
            }
            let args: Vec<&str> = match *kind {
                "container" => vec!["rm", "-f", "-v", name],
                "network" => vec!["network", "rm", name],
                _ => vec!["image", "rm", "-f", name],
            };
            let _ = Command::new("docker").args(&args).output();
        }
    }
}

/// `docker-compose --file deploy/compose.yaml ARGS` with only the given GANTRY_* variables.
fn compose_command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new("docker-compose");
    command.arg("--file").arg(workspace_root().join("deploy/compose.yaml")).args(args);
    for (name, _) in std::env::vars().filter(|(k, _)| k.starts_with("GANTRY_")) {
        command.env_remove(name);
    }
    command.envs(env.iter().copied());
    command
}

fn unique(prefix: &str) -> String {
    format!("gantry-test-{prefix}-{}-{:08x}", std::process::id(), rand::random::<u32>())
}

/// A build context like `deploy/docker/` with `bin/` holding the hub and agent programs this
/// crate built (the real programs under test-local names, renamed back; debug info
/// stripped to keep the context small).
fn docker_context(dir: &Path) {
    for entry in std::fs::read_dir(workspace_root().join("deploy/docker")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    for (built, name) in [(hub_binary(), "gantry-hub"), (agent_binary(), "gantry-agent")] {
        let target = dir.join("bin").join(name);
        let stripped = Command::new("objcopy").arg("--strip-debug").arg(&built).arg(&target).status().is_ok_and(|s| s.success());
        if !stripped {
            std::fs::copy(&built, &target).unwrap();
        }
    }
}

fn build_image(context: &Path, dockerfile: &str, base: &str, tag: &str) {
    let dockerfile = context.join(dockerfile);
    docker(&[
        "build",
        "--quiet",
        "--file",
        dockerfile.to_str().unwrap(),
        "--build-arg",
        &format!("BASE_IMAGE={base}"),
        "--tag",
        tag,
        context.to_str().unwrap(),
    ]);
}

/// The locally built Debian base runs and has curl and CA certificates.
#[test]
fn debian_base_image_is_built_locally_and_runs() {
    let image = debian_base_image().unwrap_or_else(|e| panic!("building the Debian base image: {e:#}"));
    let output = Command::new("docker")
        .args(["run", "--rm", &image, "sh", "-c", "curl --version && test -s /etc/ssl/certs/ca-certificates.crt && cat /etc/debian_version"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    assert!(stdout.starts_with("curl "), "{stdout}");
    assert!(stdout.lines().last().is_some_and(|v| v.starts_with("12.")), "bookworm is Debian 12: {stdout}");
}

/// Both Dockerfiles build on the local base; the hub image initialises itself, serves,
/// reports healthy and runs as a non-root user; an agent container enrolls with a token,
/// comes online at the hub container and keeps its identity across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_build_and_an_agent_container_comes_online_at_a_hub_container() {
    let base = debian_base_image().unwrap_or_else(|e| panic!("building the Debian base image: {e:#}"));
    let mut cleanup = Cleanup::default();
    let context = TempDir::new("docker-context");
    docker_context(context.path());
    let hub_image = cleanup.add("image", &format!("{}:latest", unique("hub")));
    let agent_image = cleanup.add("image", &format!("{}:latest", unique("agent")));
    build_image(context.path(), "hub.Dockerfile", &base, &hub_image);
    build_image(context.path(), "agent.Dockerfile", &base, &agent_image);

    // What the images declare.
    let config: Value = serde_json::from_str(&docker(&["image", "inspect", "--format", "{{json .Config}}", &hub_image])).unwrap();
    assert_eq!(config["User"], "gantry:gantry");
    assert!(config["ExposedPorts"]["7443/udp"].is_object() && config["ExposedPorts"]["8080/tcp"].is_object(), "{config}");
    assert!(config["Volumes"]["/var/lib/gantry-hub"].is_object(), "{config}");
    assert!(config["Healthcheck"]["Test"].to_string().contains("gantry-healthcheck"), "{config}");
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(docker(&["run", "--rm", &agent_image, "--version"]), format!("gantry-agent {version}"));
    assert_eq!(docker(&["run", "--rm", &hub_image, "--version"]), format!("gantry-hub {version}"));

    // Without GANTRY_PUBLIC_ADDR a fresh hub refuses to start and says why; so does an agent
    // without an identity or a token.
    let refused = run("docker", &["run", "--rm", &hub_image], "docker");
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
    assert!(text(&refused.stderr).contains("GANTRY_PUBLIC_ADDR is not set"), "{}", text(&refused.stderr));
    let refused = run("docker", &["run", "--rm", &agent_image], "docker");
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
    assert!(text(&refused.stderr).contains("GANTRY_TOKEN is not set"), "{}", text(&refused.stderr));

    // A hub on its own network, its HTTP port published on loopback.
    let network = cleanup.add("network", &unique("net"));
    docker(&["network", "create", &network]);
    let hub_name = cleanup.add("container", &unique("hub"));
    docker(&[
        "run",
        "--detach",
        "--name",
        &hub_name,
        "--network",
        &network,
        "--env",
        &format!("GANTRY_PUBLIC_ADDR={hub_name}:7443"),
        "--env",
        &format!("GANTRY_ADMIN_EMAIL={ADMIN_EMAIL}"),
        "--env",
        &format!("GANTRY_ADMIN_PASSWORD={ADMIN_PASSWORD}"),
        "--publish",
        "127.0.0.1::8080",
        &hub_image,
    ]);
    let published = docker(&["port", &hub_name, "8080/tcp"]);
    let base_url = format!("http://{}", published.lines().next().unwrap());
    let anonymous = Api { base: base_url.clone(), bearer: None, cookie: None };
    wait_for(Duration::from_secs(60), "the hub container's /healthz and /readyz", || async {
        (anonymous.get_status("/healthz").await == 200 && anonymous.get_status("/readyz").await == 200).then_some(())
    })
    .await;
    assert_eq!(docker(&["exec", &hub_name, "id", "-u"]), "10001", "the hub runs as its own user");
    let logs = run("docker", &["logs", &hub_name], "docker");
    assert!(text(&logs.stdout).contains(&format!("admin login: {ADMIN_EMAIL}")), "{}", text(&logs.stdout));

    // The image's health check: healthy in Docker's eyes, also without curl (bash only),
    // and failing when nothing answers.
    wait_for(Duration::from_secs(90), "Docker to report the hub container healthy", || async {
        (docker(&["inspect", "--format", "{{.State.Health.Status}}", &hub_name]) == "healthy").then_some(())
    })
    .await;
    let bash_only = run("docker", &["exec", "--env", "PATH=/nonexistent", &hub_name, "/bin/bash", "/usr/local/bin/gantry-healthcheck"], "docker");
    assert!(bash_only.status.success(), "bash-only health check: {}", text(&bash_only.stderr));
    for path in ["/usr/bin:/bin", "/nonexistent"] {
        let down = run(
            "docker",
            &["exec", "--env", &format!("PATH={path}"), "--env", "GANTRY_HTTP_ADDR=0.0.0.0:9", &hub_name, "/bin/bash", "/usr/local/bin/gantry-healthcheck"],
            "docker",
        );
        assert!(!down.status.success(), "a port nobody serves must fail the check (PATH={path})");
    }

    // An org and a one-use token, with the operator key the first start wrote.
    let key = docker(&["exec", &hub_name, "cat", "/var/lib/gantry-hub/operator.key"]);
    let api = anonymous.with_bearer(&key);
    let (status, body) = api.post("/api/v1/orgs", &json!({ "id": "acme", "agent_limit": 5 })).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = api.post("/api/v1/orgs/acme/enrollment-tokens", &json!({ "uses": 1, "ttl": "10m" })).await;
    assert_eq!(status, 201, "{body}");
    let token = body["token"].as_str().unwrap().to_string();

    // The agent container enrolls on its first start and comes online.
    let agent_name = cleanup.add("container", &unique("agent"));
    docker(&[
        "run",
        "--detach",
        "--name",
        &agent_name,
        "--network",
        &network,
        "--env",
        &format!("GANTRY_TOKEN={token}"),
        "--env",
        "GANTRY_LABELS=role=container site=test",
        &agent_image,
    ]);
    let agent = wait_for(Duration::from_secs(60), "the agent container online at the hub", || async {
        let (status, body) = api.get("/api/v1/orgs/acme/agents").await;
        assert_eq!(status, 200, "{body}");
        let agents = body["agents"].as_array().cloned().unwrap_or_default();
        (agents.len() == 1 && agents[0]["status"] == "online").then(|| agents[0].clone())
    })
    .await;
    assert_eq!(agent["labels"]["role"], "container", "{agent}");
    assert_eq!(agent["labels"]["site"], "test", "{agent}");

    assert_eq!(agent["hostname"].as_str(), Some(docker(&["inspect", "--format", "{{.Config.Hostname}}", &agent_name]).as_str()));

    // Restarted, it is the same agent on a new session: the token is used up, so enrolling
    // again would have failed and stopped the container.
    docker(&["restart", &agent_name]);
    let again = wait_for(Duration::from_secs(60), "the restarted agent container on a new session", || async {
        let (_, body) = api.get("/api/v1/orgs/acme/agents").await;
        let agents = body["agents"].as_array().cloned().unwrap_or_default();
        let [again] = &agents[..] else { return None };
        (again["status"] == "online" && again["connected_since"] != agent["connected_since"]).then(|| again.clone())
    })
    .await;
    assert_eq!(again["id"], agent["id"]);
    assert_eq!(docker(&["inspect", "--format", "{{.State.Running}}", &agent_name]), "true");

    // The Compose file runs this image: the hub serves on the published HTTP port, with its
    // data in the project's named volume.
    let project = cleanup.add("compose", &unique("compose").replace('-', ""));
    let (http, quic) = free_addrs();
    let (http_port, quic_port) = (http.port().to_string(), quic.port().to_string());
    let env = [
        ("GANTRY_PUBLIC_ADDR", "127.0.0.1:7443"),
        ("GANTRY_HUB_IMAGE", hub_image.as_str()),
        ("GANTRY_HTTP_PORT", http_port.as_str()),
        ("GANTRY_QUIC_PORT", quic_port.as_str()),
    ];
    let up = compose_command(&["--project-name", &project, "up", "--detach", "--no-build", "hub"], &env).output().unwrap();
    assert!(up.status.success(), "docker-compose up: {}{}", text(&up.stdout), text(&up.stderr));
    let composed = Api { base: format!("http://127.0.0.1:{http_port}"), bearer: None, cookie: None };
    wait_for(Duration::from_secs(60), "the Compose hub's /readyz", || async { (composed.get_status("/readyz").await == 200).then_some(()) }).await;
    let volumes = docker(&["volume", "ls", "--quiet", "--filter", &format!("name={project}_hub-data")]);
    assert_eq!(volumes, format!("{project}_hub-data"));
}

/// The Compose file parses with docker-compose: the hub with its data volume and the QUIC
/// port published over UDP; the TLS proxy only with the `tls` profile; a missing public
/// address is a clear error.
#[test]
fn compose_file_parses_with_docker_compose() {
    let compose = |args: &[&str], public_addr: Option<&str>| {
        let env: Vec<(&str, &str)> = public_addr.map(|addr| ("GANTRY_PUBLIC_ADDR", addr)).into_iter().collect();
        compose_command(args, &env).output().unwrap_or_else(|e| panic!("running docker-compose ({e}): apt-get install docker-compose"))
    };
    let output = compose(&["config"], Some("hub.example.com:7443"));
    assert!(output.status.success(), "docker-compose config: {}", text(&output.stderr));
    let config: Value = serde_yaml::from_slice(&output.stdout).unwrap();
    let hub = &config["services"]["hub"];
    assert_eq!(hub["environment"]["GANTRY_PUBLIC_ADDR"], "hub.example.com:7443");
    assert_eq!(hub["build"]["dockerfile"], "hub.Dockerfile");
    assert_eq!(hub["build"]["args"]["BASE_IMAGE"], "debian:bookworm-slim");
    let ports = hub["ports"].as_array().unwrap();
    assert!(ports.iter().any(|p| p["protocol"] == "udp" && p["target"] == 7443 && p["published"] == 7443), "QUIC over UDP: {ports:?}");
    assert!(ports.iter().any(|p| p.as_str() == Some("127.0.0.1:8080:8080/tcp")), "HTTP on loopback: {ports:?}");
    let volumes = hub["volumes"].as_array().unwrap();
    assert!(
        volumes.iter().any(|v| v.as_str().is_some_and(|v| v.starts_with("hub-data:/var/lib/gantry-hub"))
            || (v["source"] == "hub-data" && v["target"] == "/var/lib/gantry-hub")),
        "{volumes:?}"
    );
    assert!(config["volumes"]["hub-data"].is_object() || config["volumes"]["hub-data"].is_null(), "{config}");
    let proxy = &config["services"]["proxy"];
    assert_eq!(proxy["profiles"], json!(["tls"]));
    assert_eq!(hub["environment"]["GANTRY_TRUSTED_PROXIES"], proxy["networks"]["gantry"]["ipv4_address"], "the hub trusts exactly the proxy");

    let caddyfile = read("deploy/compose/Caddyfile");
    assert!(caddyfile.contains("reverse_proxy hub:8080"), "{caddyfile}");

    let missing = compose(&["config"], None);
    assert!(!missing.status.success());
    assert!(text(&missing.stderr).contains("set GANTRY_PUBLIC_ADDR"), "{}", text(&missing.stderr));
}

/// Render a chart with Helm's own template engine (Helm v4's Go packages, through the
/// `helm-python-sdk` wheel, pinned in .ci/run) and lint it; `Err` with Helm's message when
/// rendering fails.
fn helm_render(chart: &str, values: &Value) -> Result<Vec<Value>, String> {
    const SCRIPT: &str = r#"
import json, sys
try:
    import helm_python
except ImportError as error:
    sys.exit(f"python module helm_python missing ({error}): python3 -m pip install helm-python-sdk==0.2.2")
chart, values = sys.argv[1], json.loads(sys.argv[2])
try:
    manifests = helm_python.Chart.load(chart).render(values, name="gantry", namespace="gantry", is_install=True)
except Exception as error:
    print(json.dumps({"error": str(error)}))
    sys.exit(0)
print(json.dumps({"manifests": manifests, "lint": helm_python.lint(chart, values, strict=True)}))
"#;
    let path = workspace_root().join("deploy/helm").join(chart);
    let output = run("python3", &["-c", SCRIPT, path.to_str().unwrap(), &values.to_string()], "python3 with helm-python-sdk");
    assert!(output.status.success(), "rendering {chart}: {}", text(&output.stderr));
    let result: Value = serde_json::from_slice(&output.stdout).unwrap();
    if let Some(error) = result["error"].as_str() {
        return Err(error.to_string());
    }
    let lint = &result["lint"];
    assert!(lint["errors"].as_array().is_some_and(Vec::is_empty), "helm lint {chart}: {lint}");
    // Severity 2 and 3 are warnings and errors; 1 is information ("icon is recommended").
    let findings: Vec<&Value> = lint["messages"].as_array().unwrap().iter().filter(|m| m["severity"].as_u64() > Some(1)).collect();
    assert!(findings.is_empty(), "helm lint {chart}: {findings:?}");
    let mut documents = Vec::new();
    for (template, manifest) in result["manifests"].as_object().unwrap() {
        if template.ends_with("NOTES.txt") {
            continue;
        }
        for document in serde_yaml::Deserializer::from_str(manifest.as_str().unwrap()) {
            let value = serde_yaml::Value::deserialize(document).unwrap_or_else(|e| panic!("{template} is not YAML: {e}\n{manifest}"));
            if !value.is_null() {
                documents.push(serde_json::to_value(value).unwrap());
            }
        }
    }
    Ok(documents)
}

fn of_kind<'a>(documents: &'a [Value], kind: &str) -> Vec<&'a Value> {
    documents.iter().filter(|d| d["kind"] == kind).collect()
}

fn env_var<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"].as_array().unwrap().iter().find(|e| e["name"] == name).unwrap_or_else(|| panic!("no env {name} in {container}"))
}

/// The hub chart renders a single-replica StatefulSet with a persistent volume, Services for
/// HTTP and for QUIC over UDP, and the config from values (parsed here by the hub's own
/// config type).
#[test]
fn hub_helm_chart_renders() {
    let documents = helm_render("gantry-hub", &json!({ "publicAddr": "hub.example.com:7443" })).unwrap();
    let [set] = of_kind(&documents, "StatefulSet")[..] else { panic!("one StatefulSet: {documents:?}") };
    assert_eq!(set["spec"]["replicas"], 1);
    let claim = &set["spec"]["volumeClaimTemplates"][0];
    assert_eq!(claim["metadata"]["name"], "data");
    assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "10Gi");
    let pod = &set["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0];
    assert_eq!(env_var(container, "GANTRY_PUBLIC_ADDR")["value"], "hub.example.com:7443");
    let ports = container["ports"].as_array().unwrap();
    assert!(ports.contains(&json!({ "name": "quic", "containerPort": 7443, "protocol": "UDP" })), "{ports:?}");
    assert!(ports.contains(&json!({ "name": "http", "containerPort": 8080, "protocol": "TCP" })), "{ports:?}");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    let mounts = container["volumeMounts"].as_array().unwrap();
    assert!(mounts.iter().any(|m| m["name"] == "data" && m["mountPath"] == "/var/lib/gantry-hub"), "{mounts:?}");

    let services = of_kind(&documents, "Service");
    let protocols: BTreeSet<String> = services.iter().map(|s| s["spec"]["ports"][0]["protocol"].as_str().unwrap().to_string()).collect();
    assert_eq!(protocols, BTreeSet::from(["TCP".to_string(), "UDP".to_string()]));
    let quic = services.iter().find(|s| s["spec"]["ports"][0]["protocol"] == "UDP").unwrap();
    assert_eq!(quic["spec"]["type"], "LoadBalancer");
    assert_eq!(quic["spec"]["ports"][0]["port"], 7443);
    assert!(of_kind(&documents, "Ingress").is_empty(), "no Ingress unless enabled");

    // Config from values reaches the hub as a config file it accepts.
    let values = json!({
        "publicAddr": "hub.example.com:7443",
        "config": "heartbeat_interval_secs = 3\nliveness_timeout_secs = 9\n[quic]\nmax_connections = 5\n",
        "admin": { "existingSecret": "hub-admin" },
        "ingress": { "enabled": true, "host": "hub.example.org", "tlsSecret": "hub-tls" },
    });
    let documents = helm_render("gantry-hub", &values).unwrap();
    let [map] = of_kind(&documents, "ConfigMap")[..] else { panic!("one ConfigMap") };
    let config: gantry_hub::config::Config = toml::from_str(map["data"]["hub.toml"].as_str().unwrap()).unwrap();
    assert!(config.validate().is_empty(), "{:?}", config.validate());
    assert_eq!((config.heartbeat_interval_secs, config.quic.max_connections), (3, 5));
    let container = &of_kind(&documents, "StatefulSet")[0]["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(env_var(container, "GANTRY_ADMIN_PASSWORD")["valueFrom"]["secretKeyRef"], json!({ "name": "hub-admin", "key": "password" }));
    let [ingress] = of_kind(&documents, "Ingress")[..] else { panic!("one Ingress") };
    assert_eq!(ingress["spec"]["rules"][0]["host"], "hub.example.org");
    assert_eq!(ingress["spec"]["tls"][0]["secretName"], "hub-tls");

    let error = helm_render("gantry-hub", &json!({})).unwrap_err();
    assert!(error.contains("publicAddr"), "{error}");
}

/// The agent chart renders a DaemonSet that takes the token from a Secret, mounts the Docker
/// socket and a host state directory, sees the host's processes, and passes a config the
/// agent's own config type accepts.
#[test]
fn agent_helm_chart_renders() {
    let values = json!({ "enrollment": { "token": "gt1_example", "labels": { "role": "worker", "zone": "a" } } });
    let documents = helm_render("gantry-agent", &values).unwrap();
    let [set] = of_kind(&documents, "DaemonSet")[..] else { panic!("one DaemonSet: {documents:?}") };
    let [secret] = of_kind(&documents, "Secret")[..] else { panic!("one Secret") };
    assert_eq!(secret["stringData"]["token"], "gt1_example");
    let pod = &set["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true, "the host's /proc");
    let container = &pod["containers"][0];
    assert_eq!(env_var(container, "GANTRY_TOKEN")["valueFrom"]["secretKeyRef"], json!({ "name": secret["metadata"]["name"], "key": "token" }));
    assert_eq!(env_var(container, "GANTRY_LABELS")["value"], "role=worker zone=a");
    let volumes = pod["volumes"].as_array().unwrap();
    assert!(volumes.iter().any(|v| v["hostPath"] == json!({ "path": "/var/run/docker.sock", "type": "Socket" })), "{volumes:?}");
    assert!(volumes.iter().any(|v| v["hostPath"] == json!({ "path": "/var/lib/gantry-agent", "type": "DirectoryOrCreate" })), "{volumes:?}");
    let mounts: BTreeSet<&str> = container["volumeMounts"].as_array().unwrap().iter().map(|m| m["mountPath"].as_str().unwrap()).collect();
    assert_eq!(mounts, BTreeSet::from(["/var/lib/gantry-agent", "/etc/gantry", "/var/run/docker.sock"]));
    let [map] = of_kind(&documents, "ConfigMap")[..] else { panic!("one ConfigMap") };
    let config: gantry_agent::config::Config = toml::from_str(map["data"]["agent.toml"].as_str().unwrap()).unwrap();
    assert!(config.validate().is_empty(), "{:?}", config.validate());

    // An existing Secret instead of a token; Docker and host logs switched.
    let values = json!({ "enrollment": { "existingSecret": "fleet-token" }, "docker": { "enabled": false }, "hostLogs": true });
    let documents = helm_render("gantry-agent", &values).unwrap();
    assert!(of_kind(&documents, "Secret").is_empty(), "no Secret made when one is given");
    let pod = &of_kind(&documents, "DaemonSet")[0]["spec"]["template"]["spec"];
    assert_eq!(env_var(&pod["containers"][0], "GANTRY_TOKEN")["valueFrom"]["secretKeyRef"]["name"], "fleet-token");
    let paths: Vec<&str> = pod["volumes"].as_array().unwrap().iter().filter_map(|v| v["hostPath"]["path"].as_str()).collect();
    assert_eq!(paths, ["/var/lib/gantry-agent", "/var/log"]);
    assert!(pod["containers"][0]["env"].as_array().unwrap().iter().all(|e| e["name"] != "GANTRY_METRICS_LISTEN"), "metrics are off by default");

    // Metrics on: the agent listens on the node's port and the pod says where to scrape.
    let values = json!({ "enrollment": { "token": "gt1_example" }, "metrics": { "enabled": true, "port": 9555 } });
    let documents = helm_render("gantry-agent", &values).unwrap();
    let template = &of_kind(&documents, "DaemonSet")[0]["spec"]["template"];
    assert_eq!(env_var(&template["spec"]["containers"][0], "GANTRY_METRICS_LISTEN")["value"], "0.0.0.0:9555");
    let annotations = &template["metadata"]["annotations"];
    assert_eq!((&annotations["prometheus.io/scrape"], &annotations["prometheus.io/port"]), (&json!("true"), &json!("9555")), "{annotations}");

    let error = helm_render("gantry-agent", &json!({})).unwrap_err();
    assert!(error.contains("enrollment.token"), "{error}");
}

/// Every `.Values.x.y` a chart's templates read is defined in its values.yaml, so a typo
/// cannot silently render as empty.
#[test]
fn helm_templates_only_read_defined_values() {
    for chart in ["gantry-hub", "gantry-agent"] {
        let dir = workspace_root().join("deploy/helm").join(chart);
        let values: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(dir.join("values.yaml")).unwrap()).unwrap();
        let metadata: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(dir.join("Chart.yaml")).unwrap()).unwrap();
        assert_eq!(metadata["name"].as_str(), Some(chart));
        let mut checked = 0;
        for entry in std::fs::read_dir(dir.join("templates")).unwrap() {
            let path = entry.unwrap().path();
            let template = std::fs::read_to_string(&path).unwrap();
            for (at, _) in template.match_indices(".Values.") {
                let reference: String = template[at + ".Values.".len()..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '.').collect();
                let mut node = &values;
                for key in reference.trim_end_matches('.').split('.') {
                    node = node.get(key).unwrap_or_else(|| panic!("{}: .Values.{reference} is not in values.yaml", path.display()));
                }
                checked += 1;
            }
        }
        assert!(checked > 10, "{chart}: only {checked} references found");
    }
}

/// systemd-analyze accepts the hub's unit without a warning (and does flag a broken copy),
/// and rates its sandboxing as tight.
#[test]
fn hub_systemd_unit_verifies() {
    let dir = TempDir::new("systemd");
    let unit = read("deploy/systemd/gantry-hub.service");
    assert!(unit.contains("ExecStart=/usr/local/bin/gantry-hub serve"), "{unit}");
    // verify checks that the programs exist: point them at the hub this crate built.
    let unit = unit.replace("/usr/local/bin/gantry-hub", hub_binary().to_str().unwrap());
    let path = dir.path().join("gantry-hub.service");
    std::fs::write(&path, &unit).unwrap();
    let verify = |path: &Path| run("systemd-analyze", &["verify", path.to_str().unwrap()], "apt-get install systemd");
    let output = verify(&path);
    assert!(output.status.success() && output.stderr.is_empty(), "systemd-analyze verify: {}{}", text(&output.stdout), text(&output.stderr));

    let broken = dir.path().join("broken.service");
    std::fs::write(&broken, unit.replace("Restart=on-failure", "Restart=sometimes")).unwrap();
    let output = verify(&broken);
    assert!(text(&output.stderr).contains("restart specifier"), "the verifier reads the unit: {}", text(&output.stderr));

    let output = run("systemd-analyze", &["security", "--offline=yes", path.to_str().unwrap()], "apt-get install systemd");
    let report = text(&output.stdout) + &text(&output.stderr);
    let level: f64 = report
        .split("Overall exposure level for gantry-hub.service: ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {report}"));
    assert!(level <= 2.0, "exposure level {level} (systemd rates 0-10, lower is tighter):\n{report}");
}

/// Lines `# key = value` and `# [table]` in an example config are options shown but unset:
/// the text with them uncommented.
fn uncommented(example: &str) -> String {
    example.lines().map(|line| setting(line).filter(|_| line.starts_with("# ")).unwrap_or(line)).collect::<Vec<_>>().join("\n")
}

/// The setting a line holds, commented or not: `key = value` or `[table]`.
fn setting(line: &str) -> Option<&str> {
    let body = line.strip_prefix("# ").unwrap_or(line);
    let is_key = body.split_once(" = ").is_some_and(|(key, _)| !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
    let is_table = body.starts_with('[') && body.ends_with(']') && body[1..body.len() - 1].chars().all(|c| c.is_ascii_lowercase() || c == '_' || c == '.');
    (is_key || is_table).then_some(body)
}

/// Dotted paths of every key in a tree of tables.
fn key_paths(value: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    if let Some(map) = value.as_object() {
        for (key, child) in map {
            let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
            key_paths(child, &path, out);
            out.insert(path);
        }
    }
}

/// The example config lists every option the config type has (and nothing else), each
/// with a comment right above it; as shipped it parses and validates.
fn check_example<C: serde::Serialize + serde::de::DeserializeOwned + Default>(file: &str, validate: impl Fn(&C) -> Vec<String>) {
    let example = read(file);
    let shipped: C = toml::from_str(&example).unwrap_or_else(|e| panic!("{file}: {e}"));
    assert!(validate(&shipped).is_empty(), "{file}: {:?}", validate(&shipped));
    // Uncommented, every option shown is one the config type knows (unknown fields are
    // refused), with a value of the right type.
    let every = uncommented(&example);
    let _: C = toml::from_str(&every).unwrap_or_else(|e| panic!("{file} with every option uncommented: {e}"));
    let mut shown = BTreeSet::new();
    key_paths(&serde_json::to_value(toml::from_str::<toml::Value>(&every).unwrap()).unwrap(), "", &mut shown);
    // Serialised to JSON, unset options appear as null, so every field is named.
    let mut fields = BTreeSet::new();
    key_paths(&serde_json::to_value(C::default()).unwrap(), "", &mut fields);
    let missing: Vec<&String> = fields.difference(&shown).collect();
    assert!(missing.is_empty(), "{file} does not show these options: {missing:?}");
    let unknown: Vec<&String> = shown.difference(&fields).collect();
    assert!(unknown.is_empty(), "{file} shows options the config does not have: {unknown:?}");
    let lines: Vec<&str> = example.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if setting(line).is_some() {
            let above = if i > 0 { lines[i - 1] } else { "" };
            assert!(above.starts_with('#') && setting(above).is_none(), "{file}:{}: `{line}` has no comment above it", i + 1);
        }
    }
}

#[test]
fn example_configs_show_and_document_every_option() {
    check_example::<gantry_hub::config::Config>("deploy/hub.example.toml", |c| c.validate());
    check_example::<gantry_agent::config::Config>("deploy/agent.example.toml", |c| c.validate());
}

/// Metric names in PromQL text: every `gantry_...` word.
/// The Gantry and process metrics an expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for prefix in ["gantry_", "process_"] {
        for (at, _) in expr.match_indices(prefix) {
            if at > 0 && expr[..at].chars().last().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            names.insert(expr[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect());
        }
    }
    names
}

/// The metric names an exposition declares with `# TYPE`.
fn exported(exposition: &str) -> BTreeSet<String> {
    exposition.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split_whitespace().next()).map(str::to_string).collect()
}

/// `curl` against `url` with extra arguments: (status line, whole output).
fn curl(url: &str, args: &[&str]) -> (String, String) {
    let mut all = vec!["-sS", "--max-time", "10", "-i"];
    all.extend_from_slice(args);
    all.push(url);
    let out = run("curl", &all, "curl");
    assert!(out.status.success(), "curl {url}: {}", text(&out.stderr));
    let body = text(&out.stdout);
    (body.lines().next().unwrap_or("").trim().to_string(), body)
}

fn queries(dashboard: &Value, out: &mut Vec<String>) {
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push(target["expr"].as_str().unwrap_or_else(|| panic!("a target without expr in {}", panel["title"])).to_string());
        }
        queries(panel, out);
    }
}

/// The Grafana dashboards parse, and every metric their queries read is one a running hub
/// with a connected agent exports at /metrics. (Agents export no metrics endpoint of their
/// own: the agents dashboard reads the hub's view of them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafana_dashboards_query_only_exported_metrics() {
    let dir = TempDir::new("grafana");
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    hub.create_org("acme", 5).await;
    let token = hub.token("acme", 1, "10m").await;
    let state = dir.path().join("agent");
    let id = enroll(&token, &state).await.unwrap();
    let metrics_addr = free_tcp_addr();
    let agent = InProcessAgent::start_with(gantry_agent::config::Config {
        state_dir: state.clone(),
        metrics_listen: Some(metrics_addr),
        ..gantry_agent::config::Config::default()
    });
    hub.wait_status(&id, "online", Duration::from_secs(30)).await;
    let api = hub.api();
    let hub_exposition = wait_for(Duration::from_secs(30), "heartbeats counted at /metrics", || async {
        let (status, _, body) = api.send("GET", "/metrics", None, Vec::new()).await;
        assert_eq!(status, 200);
        let heartbeats = body.lines().find_map(|l| l.strip_prefix("gantry_heartbeats_total ")).and_then(|v| v.parse::<f64>().ok());
        (heartbeats > Some(0.0) && body.contains("gantry_agents_connected 1")).then_some(body)
    })
    .await;
    let url = format!("http://{metrics_addr}/metrics");
    let agent_exposition = wait_for(Duration::from_secs(30), "the agent's own /metrics showing its session", || async {
        let (status, body) = curl(&url, &[]);
        (status.contains("200") && body.contains("gantry_agent_connected 1")).then_some(body)
    })
    .await;

    let mut uids = BTreeSet::new();
    let sources = [
        ("dashboards/grafana/gantry-hub.json", "the hub", &hub_exposition),
        ("dashboards/grafana/gantry-agents.json", "the hub", &hub_exposition),
        ("dashboards/grafana/gantry-agent.json", "the agent", &agent_exposition),
    ];
    for (file, source, exposition) in sources {
        let exported = exported(exposition);
        assert!(exported.len() > 10, "{source}: {exported:?}");
        let dashboard: Value = serde_json::from_str(&read(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(uids.insert(dashboard["uid"].as_str().unwrap().to_string()), "{file}: uid taken");
        let mut exprs = Vec::new();
        queries(&dashboard, &mut exprs);
        for variable in dashboard["templating"]["list"].as_array().unwrap() {
            if let Some(query) = variable["query"]["query"].as_str() {
                exprs.push(query.to_string());
            }
        }
        assert!(exprs.len() > 10, "{file}: {} queries", exprs.len());
        let mut used = BTreeSet::new();
        for expr in &exprs {
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{file}: `{expr}` reads no gantry metric");
            let opened = |o: char, c: char| expr.chars().filter(|x| *x == o).count() == expr.chars().filter(|x| *x == c).count();
            assert!(opened('(', ')') && opened('{', '}') && opened('[', ']'), "{file}: unbalanced `{expr}`");
            used.extend(names);
        }
        let unknown: Vec<&String> = used.difference(&exported).collect();
        assert!(unknown.is_empty(), "{file} queries metrics {source} does not export: {unknown:?}");
    }
    agent.stop().await.unwrap();
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_serves_its_own_metrics_to_prometheus_clients() {
    let dir = TempDir::new("agent-metrics");
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    hub.create_org("acme", 5).await;
    let token = hub.token("acme", 1, "10m").await;
    let state = dir.path().join("agent");
    let id = enroll(&token, &state).await.unwrap();
    let log = dir.path().join("app.log");
    std::fs::write(&log, "one\ntwo\nthree\n").unwrap();
    let metrics_addr = free_tcp_addr();
    let mut config = gantry_agent::config::Config { state_dir: state.clone(), metrics_listen: Some(metrics_addr), ..gantry_agent::config::Config::default() };
    config.files.paths = vec![log.display().to_string()];
    config.docker.enabled = false;
    let agent = InProcessAgent::start_with(config);
    hub.wait_status(&id, "online", Duration::from_secs(30)).await;
    let url = format!("http://{metrics_addr}/metrics");
    let value = |body: &str, series: &str| -> Option<f64> { body.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok()) };
    // The three file lines are spooled, then acknowledged by the hub: both counters say so.
    let body = wait_for(Duration::from_secs(30), "the agent's log lines acknowledged at its /metrics", || async {
        let (status, body) = curl(&url, &[]);
        assert!(status.contains("200"), "{status}");
        (value(&body, "gantry_agent_records_acknowledged_total{class=\"logs\"}") >= Some(3.0)).then_some(body)
    })
    .await;
    assert!(body.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{body}");
    assert_eq!(value(&body, "gantry_agent_connected"), Some(1.0));
    assert!(value(&body, "gantry_agent_sessions_established_total") >= Some(1.0));
    assert!(value(&body, "gantry_agent_records_spooled_total{class=\"logs\"}") >= Some(3.0));
    assert!(value(&body, "gantry_agent_spool_cap_bytes{class=\"logs\"}") > Some(0.0));
    assert!(value(&body, "process_resident_memory_bytes") > Some(1e6));
    assert!(body.contains(&format!("gantry_agent_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))), "{body}");
    // Only /metrics, only GET and HEAD; HEAD has no body.
    assert!(curl(&format!("http://{metrics_addr}/"), &[]).0.contains("404"));
    assert!(curl(&url, &["-X", "POST"]).0.contains("405"));
    let (status, head) = curl(&url, &["-I"]);
    assert!(status.contains("200") && !head.contains("# TYPE"), "{head}");
    // When the hub goes away the agent says so.
    hub.stop().await;
    wait_for(Duration::from_secs(30), "gantry_agent_connected 0 after the hub stopped", || async {
        let (_, body) = curl(&url, &[]);
        (value(&body, "gantry_agent_connected") == Some(0.0)).then_some(())
    })
    .await;
    agent.stop().await.unwrap();
    // A taken address is a clear start-up error, not a silent agent without metrics.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config =
        gantry_agent::config::Config { state_dir: state, metrics_listen: Some(taken.local_addr().unwrap()), ..gantry_agent::config::Config::default() };
    let error = InProcessAgent::start_with(config).stop().await.expect_err("the agent must not start on a taken metrics address");
    assert!(error.to_string().contains("metrics_listen"), "{error}");
}
