//! The deployment files, checked as far as a machine without a Docker engine or a cluster can:
//! the Kubernetes manifests validate offline against the Kubernetes API schemas
//! (`kubernetes-validate`), the compose file against the Compose specification's schema
//! (`check-jsonschema`), both installed from PyPI by `.ci/deploy-tools`; and every binary, flag,
//! path, port and environment variable that they and the Dockerfile name exists and matches the
//! code.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use serde::Deserialize as _;

use serde_json::Value;
use warpline_tests::{bin, repo_root};

fn compose() -> Value {
    let text = std::fs::read_to_string(repo_root().join("docker-compose.yml"))
        .expect("docker-compose.yml");
    let yaml: serde_norway::Value =
        serde_norway::from_str(&text).expect("docker-compose.yml is valid YAML");
    serde_json::to_value(yaml).expect("compose as JSON")
}

fn help(binary: &str, sub: Option<&str>) -> String {
    let mut cmd = Command::new(bin(binary));
    if let Some(s) = sub {
        cmd.arg(s);
    }
    let out = cmd.arg("--help").output().expect("run --help");
    assert!(out.status.success(), "{binary} {sub:?} --help failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every `--flag` of a command line.
fn flags(command: &[String]) -> Vec<String> {
    command
        .iter()
        .filter(|a| a.starts_with("--"))
        .map(|a| a.split('=').next().unwrap().to_string())
        .collect()
}

fn command_of(service: &Value) -> Vec<String> {
    service["command"]
        .as_array()
        .expect("commands are exec-form lists")
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// All text of the project's sources, for "is this variable read anywhere?".
fn sources() -> String {
    let mut all = String::new();
    let mut stack = vec![
        repo_root().join("shared/src"),
        repo_root().join("coordinator/src"),
        repo_root().join("worker/src"),
        repo_root().join("telemetry/src"),
        repo_root().join("amqp/src"),
        repo_root().join("executor/src"),
        repo_root().join("examples/datawarp/tools/src"),
    ];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "rs") {
                all.push_str(&std::fs::read_to_string(&p).unwrap());
            }
        }
    }
    all
}

#[test]
fn compose_services_are_wired_to_real_binaries_flags_and_variables() {
    let c = compose();
    let services = c["services"].as_object().expect("services");
    for name in ["rabbitmq", "postgres", "coordinator", "worker"] {
        assert!(services.contains_key(name), "service `{name}` missing");
    }
    // The coordinator and worker commands name built binaries and flags they accept.
    let coord = command_of(&services["coordinator"]);
    assert_eq!(&coord[..2], ["warpline", "serve"]);
    let serve_help = help("warpline", Some("serve"));
    for f in flags(&coord) {
        assert!(serve_help.contains(&f), "`warpline serve` has no flag {f}");
    }
    let worker = command_of(&services["worker"]);
    assert_eq!(worker[0], "warpline-worker");
    let worker_help = help("warpline-worker", None);
    for f in flags(&worker) {
        assert!(
            worker_help.contains(&f),
            "`warpline-worker` has no flag {f}"
        );
    }
    // The worker's allowlist is exactly the DataWarp pipeline's commands, all built.
    let allow = worker[worker.iter().position(|a| a == "--allow").unwrap() + 1].clone();
    let allowed: BTreeSet<&str> = allow.split(',').collect();
    let pipeline: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("examples/datawarp/pipeline.json")).unwrap(),
    )
    .unwrap();
    let commands: BTreeSet<&str> = pipeline["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["command"].as_str().unwrap())
        .collect();
    assert_eq!(allowed, commands);
    for c in &commands {
        bin(c);
    }
    // Workers scale: no fixed name, no host port.
    assert!(services["worker"].get("container_name").is_none());
    assert!(services["worker"].get("ports").is_none());
    // The coordinator listens where its port is published.
    let http = &coord[coord.iter().position(|a| a == "--http").unwrap() + 1];
    assert!(http.ends_with(":8080"), "{http}");
    assert_eq!(services["coordinator"]["ports"][0], "8080:8080");
    // Healthchecks gate the start order.
    for dep in ["rabbitmq", "postgres"] {
        assert_eq!(
            services["coordinator"]["depends_on"][dep]["condition"], "service_healthy",
            "coordinator must wait for {dep}"
        );
        assert!(
            services[dep].get("healthcheck").is_some(),
            "{dep} needs a healthcheck"
        );
    }
    // Every variable the stack sets is read by the code.
    let src = sources();
    for (svc, s) in services {
        if let Some(env) = s.get("environment").and_then(Value::as_object) {
            for var in env
                .keys()
                .filter(|k| k.starts_with("WARPLINE_") || k.starts_with("DATAWARP_"))
            {
                assert!(
                    src.contains(&format!("\"{var}\"")),
                    "{svc} sets {var}, which no code reads"
                );
            }
        }
    }
    // Mounted files exist; the artefact volume is shared by the coordinator and the workers.
    for s in services.values() {
        for v in s
            .get("volumes")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let v = v.as_str().unwrap();
            if let Some(local) = v.strip_prefix("./") {
                let path = local.split(':').next().unwrap();
                assert!(
                    repo_root().join(path).exists(),
                    "{path} is mounted but missing"
                );
            }
        }
    }
    let work = "artefacts:/opt/warpline/examples/datawarp/work";
    for svc in ["coordinator", "worker"] {
        let vols = services[svc]["volumes"].as_array().unwrap();
        assert!(vols.iter().any(|v| v == work), "{svc} must mount {work}");
    }
    let rabbit_conf =
        std::fs::read_to_string(repo_root().join("deploy/rabbitmq/rabbitmq.conf")).unwrap();
    let timeout: u64 = rabbit_conf
        .lines()
        .find_map(|l| l.trim().strip_prefix("consumer_timeout = "))
        .expect("consumer_timeout set")
        .parse()
        .unwrap();
    let longest = pipeline["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["timeout_s"].as_u64().unwrap())
        .max()
        .unwrap();
    assert!(
        timeout > longest * 1000,
        "consumer_timeout {timeout} ms is not above the longest step ({longest} s)"
    );
}

#[test]
fn the_dockerfile_copies_what_exists() {
    let text = std::fs::read_to_string(repo_root().join("deploy/Dockerfile")).unwrap();
    let mut copied_binaries = BTreeSet::new();
    for word in text.split_whitespace() {
        if let Some(name) = word.strip_prefix("/src/target/release/") {
            copied_binaries.insert(name.to_string());
        }
    }
    for b in &copied_binaries {
        bin(b);
    }
    for needed in [
        "warpline",
        "warpline-worker",
        "url_to_manifest",
        "enrich_manifest",
        "load-batch",
        "export_to_parquet",
    ] {
        assert!(copied_binaries.contains(needed), "the image lacks {needed}");
    }
    // Every plain COPY source exists in the repository.
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let src = parts[1];
        if src != "." {
            assert!(repo_root().join(src).exists(), "COPY {src}: missing");
        }
    }
    // The pipeline the image ships is the one compose's coordinator is told to use.
    assert!(text.contains("/opt/warpline/examples/datawarp/pipeline.json"));
}

/// `target/deploy-tools` (or `$WARPLINE_DEPLOY_TOOLS`), where `.ci/deploy-tools` installs the
/// validators; fails, saying how to install them, when they are missing.
fn tools() -> PathBuf {
    let dir = std::env::var_os("WARPLINE_DEPLOY_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/deploy-tools"));
    for needed in [
        "bin/kubernetes-validate",
        "bin/check-jsonschema",
        "compose_spec.json",
    ] {
        assert!(
            dir.join(needed).exists(),
            "`{}` is missing: run `.ci/deploy-tools` (it installs the offline validators from PyPI into target/deploy-tools)",
            dir.join(needed).display()
        );
    }
    dir
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn k8s_dir() -> PathBuf {
    repo_root().join("deploy/k8s")
}

/// Every object of every manifest (multi-document YAML), with the file it came from.
fn k8s_objects() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(k8s_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for p in files {
        let text = std::fs::read_to_string(&p).unwrap();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let v = serde_norway::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{name} is not valid YAML: {e}"));
            out.push((name.clone(), serde_json::to_value(v).unwrap()));
        }
    }
    out
}

fn object<'a>(objects: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .map(|(_, o)| o)
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} `{name}` in deploy/k8s"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

/// The value following `flag` in a command line.
fn flag_value<'a>(command: &'a [String], flag: &str) -> &'a str {
    let i = command
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("{command:?} has no {flag}"));
    &command[i + 1]
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit_once(':').unwrap().1.parse().unwrap()
}

#[test]
fn kubernetes_manifests_validate_offline_against_the_api_schemas() {
    let tools = tools();
    let mut files: Vec<PathBuf> = std::fs::read_dir(k8s_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "yaml")
                && p.file_name().is_some_and(|n| n != "kustomization.yaml")
        })
        .collect();
    files.sort();
    assert!(files.len() >= 6, "{files:?}");
    let (ok, out) = run(Command::new(tools.join("bin/kubernetes-validate"))
        .args(["--strict", "--kubernetes-version", "1.31.0"])
        .args(&files));
    assert!(ok, "the manifests do not validate:\n{out}");
    // Every built-in object was checked against a schema (only the CRDs have none).
    for (file, o) in k8s_objects() {
        let kind = o["kind"].as_str().unwrap().to_lowercase();
        let name = o["metadata"]["name"].as_str().unwrap_or_default();
        let crd = [
            "ScaledObject",
            "TriggerAuthentication",
            "PodMonitor",
            "Kustomization",
        ]
        .contains(&o["kind"].as_str().unwrap());
        if !crd {
            assert!(
                out.contains(&format!("{file} passed for resource {kind}/{name}")),
                "{file}: {kind}/{name} was not validated:\n{out}"
            );
        }
    }
    // The validator does reject a wrong manifest (a control, so a pass above means something).
    let bad = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    let text = std::fs::read_to_string(k8s_dir().join("worker.yaml")).unwrap();
    std::fs::write(bad.path(), text.replacen("replicas: 2", "replicas: two", 1)).unwrap();
    let (ok, out) = run(Command::new(tools.join("bin/kubernetes-validate"))
        .args(["--strict", "--kubernetes-version", "1.31.0"])
        .arg(bad.path()));
    assert!(!ok, "a Deployment with `replicas: two` validated:\n{out}");
}

#[test]
fn kubernetes_manifests_name_real_binaries_flags_ports_paths_and_variables() {
    let objects = k8s_objects();
    // The kustomization lists every manifest (the optional PodMonitor aside), and only those.
    let kustomization: serde_norway::Value = serde_norway::from_str(
        &std::fs::read_to_string(k8s_dir().join("kustomization.yaml")).unwrap(),
    )
    .unwrap();
    let kustomization = serde_json::to_value(kustomization).unwrap();
    let listed: BTreeSet<String> = strings(&kustomization["resources"]).into_iter().collect();
    let files: BTreeSet<String> = objects
        .iter()
        .map(|(f, _)| f.clone())
        .filter(|f| f != "kustomization.yaml" && f != "servicemonitor.yaml")
        .collect();
    assert_eq!(listed, files, "kustomization.yaml's resources");
    let ns = object(&objects, "Namespace", "warpline");
    assert_eq!(kustomization["namespace"], ns["metadata"]["name"]);

    let config = object(&objects, "ConfigMap", "warpline-config");
    let secret = object(&objects, "Secret", "warpline-secrets");
    let src = sources();
    // Every variable set is read by the code (OTEL_* by the OpenTelemetry SDK; KEDA's by KEDA).
    let mut set: Vec<String> = Vec::new();
    set.extend(config["data"].as_object().unwrap().keys().cloned());
    set.extend(secret["stringData"].as_object().unwrap().keys().cloned());
    let coord = object(&objects, "Deployment", "warpline-coordinator");
    let worker = object(&objects, "Deployment", "warpline-worker");
    for d in [coord, worker] {
        for e in d["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap()
        {
            set.push(e["name"].as_str().unwrap().to_string());
            if let Some(r) = e["valueFrom"]["secretKeyRef"].as_object() {
                assert_eq!(r["name"], "warpline-secrets");
                let key = r["key"].as_str().unwrap();
                assert!(
                    secret["stringData"].get(key).is_some(),
                    "the Secret has no {key}"
                );
            }
        }
    }
    for var in &set {
        if var.starts_with("WARPLINE_") || var.starts_with("DATAWARP_") {
            assert!(
                src.contains(&format!("\"{var}\"")),
                "deploy/k8s sets {var}, which no code reads"
            );
        } else {
            assert!(
                var.starts_with("OTEL_") || var == "POD_NAME" || var.starts_with("KEDA_"),
                "unexpected variable {var}"
            );
        }
    }
    for otel in [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_SERVICE_NAME",
        "OTEL_RESOURCE_ATTRIBUTES",
    ] {
        assert!(set.iter().any(|v| v == otel), "{otel} is not set");
    }

    // The worker's allowlist is the DataWarp pipeline's commands.
    let pipeline: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("examples/datawarp/pipeline.json")).unwrap(),
    )
    .unwrap();
    let commands: BTreeSet<&str> = pipeline["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["command"].as_str().unwrap())
        .collect();
    let allowed: BTreeSet<&str> = config["data"]["WARPLINE_ALLOW"]
        .as_str()
        .unwrap()
        .split(',')
        .collect();
    assert_eq!(allowed, commands);

    let dockerfile = std::fs::read_to_string(repo_root().join("deploy/Dockerfile")).unwrap();
    let uid = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the image names a USER")
        .split(':')
        .next()
        .unwrap()
        .to_string();
    let serve_help = help("warpline", Some("serve"));
    let worker_help = help("warpline-worker", None);
    let work = "/opt/warpline/examples/datawarp/work";
    for (d, binary, help_text, port_flag, port_name) in [
        (coord, "warpline", &serve_help, "--http", "http"),
        (
            worker,
            "warpline-worker",
            &worker_help,
            "--metrics",
            "metrics",
        ),
    ] {
        let name = d["metadata"]["name"].as_str().unwrap();
        let pod = &d["spec"]["template"];
        let spec = &pod["spec"];
        let c = &spec["containers"][0];
        let cmd = strings(&c["command"]);
        assert_eq!(cmd[0], binary, "{name}");
        bin(binary);
        for f in flags(&cmd) {
            assert!(
                help_text.contains(&f),
                "`{binary}` has no flag {f} ({name})"
            );
        }
        // One port: the flag's, the container's, the probes' and the scrape annotation's.
        let port = port_of(flag_value(&cmd, port_flag));
        assert_eq!(c["ports"][0]["name"], port_name, "{name}");
        assert_eq!(c["ports"][0]["containerPort"], port, "{name}");
        for probe in ["readinessProbe", "livenessProbe"] {
            assert_eq!(c[probe]["httpGet"]["port"], port_name, "{name} {probe}");
        }
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{name}");
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{name}");
        let ann = &pod["metadata"]["annotations"];
        assert_eq!(ann["prometheus.io/scrape"], "true", "{name}");
        assert_eq!(ann["prometheus.io/port"], port.to_string(), "{name}");
        assert_eq!(ann["prometheus.io/path"], "/metrics", "{name}");
        // Non-root as the image's user, no privilege, a read-only root, bounded resources.
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{name}");
        assert_eq!(
            spec["securityContext"]["runAsUser"].to_string(),
            uid,
            "{name}"
        );
        assert_eq!(
            c["securityContext"]["allowPrivilegeEscalation"], false,
            "{name}"
        );
        assert_eq!(
            c["securityContext"]["readOnlyRootFilesystem"], true,
            "{name}"
        );
        for k in ["cpu", "memory"] {
            assert!(
                c["resources"]["requests"][k].is_string(),
                "{name} requests.{k}"
            );
            assert!(c["resources"]["limits"][k].is_string(), "{name} limits.{k}");
        }
        // The shared artefact volume where the example's workdir is.
        let mount = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "artefacts")
            .unwrap_or_else(|| panic!("{name} does not mount the artefacts"));
        assert_eq!(mount["mountPath"], work, "{name}");
        let vol = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "artefacts")
            .unwrap();
        assert_eq!(
            vol["persistentVolumeClaim"]["claimName"],
            "warpline-artefacts"
        );
        let sel = &d["spec"]["selector"]["matchLabels"];
        for (k, v) in sel.as_object().unwrap() {
            assert_eq!(&pod["metadata"]["labels"][k], v, "{name}'s selector");
        }
    }
    assert!(
        dockerfile.contains(&format!("mkdir -p {work}")),
        "the image creates {work}"
    );
    let pvc = object(&objects, "PersistentVolumeClaim", "warpline-artefacts");
    assert_eq!(
        pvc["spec"]["accessModes"],
        serde_json::json!(["ReadWriteMany"])
    );
    // Leader and standby; the audit log on the shared volume.
    assert_eq!(coord["spec"]["replicas"], 2);
    assert_eq!(coord["spec"]["strategy"]["type"], "Recreate");
    let ccmd = strings(&coord["spec"]["template"]["spec"]["containers"][0]["command"]);
    assert!(flag_value(&ccmd, "--audit").starts_with(work));
    assert!(flag_value(&ccmd, "--http").starts_with("0.0.0.0:"));
    assert!(
        src.contains("\"/readyz\"") && src.contains("\"/healthz\"") && src.contains("\"/metrics\"")
    );
    // The Service reaches the coordinators' API port.
    let svc = object(&objects, "Service", "warpline-coordinator");
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "http");
    assert_eq!(
        svc["spec"]["selector"],
        coord["spec"]["selector"]["matchLabels"]
    );
    // The worker's budget selects the workers.
    let pdb = object(&objects, "PodDisruptionBudget", "warpline-worker");
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        worker["spec"]["selector"]["matchLabels"]
    );
    assert!(
        worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap()
            > worker["spec"]["template"]["spec"]["containers"][0]["env"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == "WARPLINE_DRAIN_S")
                .and_then(|e| e["value"].as_str())
                .unwrap()
                .parse::<u64>()
                .unwrap(),
        "the grace period covers the drain"
    );
    // KEDA scales the worker Deployment on its pool's steps queue, with a key the Secret has.
    let so = object(&objects, "ScaledObject", "warpline-worker");
    assert_eq!(so["apiVersion"], "keda.sh/v1alpha1");
    assert_eq!(
        so["spec"]["scaleTargetRef"]["name"],
        worker["metadata"]["name"]
    );
    let trigger = &so["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "rabbitmq");
    assert_eq!(trigger["metadata"]["mode"], "QueueLength");
    let topology = warpline_shared::fleet::Topology::new(
        config["data"]["WARPLINE_QUEUE_PREFIX"]
            .as_str()
            .unwrap()
            .to_string(),
    );
    let pool = config["data"]["WARPLINE_POOL"].as_str().unwrap();
    assert_eq!(trigger["metadata"]["queueName"], topology.steps_queue(pool));
    let auth_name = trigger["authenticationRef"]["name"].as_str().unwrap();
    let auth = object(&objects, "TriggerAuthentication", auth_name);
    let target = &auth["spec"]["secretTargetRef"][0];
    assert_eq!(target["parameter"], "host");
    assert_eq!(target["name"], "warpline-secrets");
    assert!(
        secret["stringData"]
            .get(target["key"].as_str().unwrap())
            .is_some()
    );
    // The optional PodMonitor scrapes both named ports.
    let pm = object(&objects, "PodMonitor", "warpline");
    let ports: BTreeSet<&str> = pm["spec"]["podMetricsEndpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["port"].as_str().unwrap())
        .collect();
    assert_eq!(ports, BTreeSet::from(["http", "metrics"]));
}

#[test]
fn compose_validates_against_the_compose_specification() {
    let tools = tools();
    let schema = tools.join("compose_spec.json");
    let compose = repo_root().join("docker-compose.yml");
    let (ok, out) = run(Command::new(tools.join("bin/check-jsonschema"))
        .arg("--schemafile")
        .arg(&schema)
        .arg(&compose));
    assert!(
        ok,
        "docker-compose.yml does not follow the Compose specification:\n{out}"
    );
    // A control: a misspelt service key is refused.
    let bad = tempfile::Builder::new().suffix(".yml").tempfile().unwrap();
    let text = std::fs::read_to_string(&compose).unwrap();
    std::fs::write(
        bad.path(),
        text.replacen(
            "    restart: unless-stopped",
            "    restartt: unless-stopped",
            1,
        ),
    )
    .unwrap();
    let (ok, out) = run(Command::new(tools.join("bin/check-jsonschema"))
        .arg("--schemafile")
        .arg(&schema)
        .arg(bad.path()));
    assert!(!ok, "a compose file with `restartt` validated:\n{out}");
}

#[test]
fn compose_health_checks_restarts_and_the_observability_profile_are_wired() {
    let c = compose();
    let services = c["services"].as_object().unwrap();
    for (name, s) in services {
        assert_eq!(
            s["restart"], "unless-stopped",
            "{name} has no restart policy"
        );
    }
    // The coordinator and the workers are healthy when /readyz on their own port says so.
    let coord = command_of(&services["coordinator"]);
    let worker = command_of(&services["worker"]);
    for (svc, port) in [
        ("coordinator", port_of(flag_value(&coord, "--http"))),
        ("worker", port_of(flag_value(&worker, "--metrics"))),
    ] {
        let test = strings(&services[svc]["healthcheck"]["test"]).join(" ");
        assert!(
            test.contains(&format!("/dev/tcp/127.0.0.1/{port}")) && test.contains("GET /readyz"),
            "{svc}'s healthcheck does not ask /readyz on {port}: {test}"
        );
    }
    assert_eq!(
        services["worker"]["depends_on"]["coordinator"]["condition"],
        "service_healthy"
    );
    // The profile: a collector fed over OTLP/gRPC, Jaeger behind it, Prometheus scraping both.
    for svc in ["otel-collector", "jaeger", "prometheus"] {
        assert_eq!(
            services[svc]["profiles"],
            serde_json::json!(["observability"]),
            "{svc} belongs to the observability profile"
        );
    }
    let env = &c["x-warpline-env"];
    assert_eq!(env["OTEL_EXPORTER_OTLP_PROTOCOL"], "grpc");
    let collector: serde_norway::Value = serde_norway::from_str(
        &std::fs::read_to_string(repo_root().join("deploy/otel/collector.yaml")).unwrap(),
    )
    .unwrap();
    let collector = serde_json::to_value(collector).unwrap();
    assert!(
        collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
            .as_str()
            .unwrap()
            .ends_with(":4317")
    );
    assert!(
        collector["exporters"]["otlp/jaeger"]["endpoint"]
            .as_str()
            .unwrap()
            .starts_with("jaeger:")
    );
    let text = std::fs::read_to_string(repo_root().join("docker-compose.yml")).unwrap();
    assert!(
        text.contains("OTEL_EXPORTER_OTLP_ENDPOINT=http://otel-collector:4317"),
        "the compose file says where the collector listens"
    );
    let prom: serde_norway::Value = serde_norway::from_str(
        &std::fs::read_to_string(repo_root().join("deploy/prometheus/prometheus.yml")).unwrap(),
    )
    .unwrap();
    let prom = serde_json::to_value(prom).unwrap();
    let jobs = prom["scrape_configs"].as_array().unwrap();
    assert_eq!(
        jobs[0]["static_configs"][0]["targets"][0],
        format!("coordinator:{}", port_of(flag_value(&coord, "--http")))
    );
    assert_eq!(jobs[1]["dns_sd_configs"][0]["names"][0], "worker");
    assert_eq!(
        jobs[1]["dns_sd_configs"][0]["port"],
        port_of(flag_value(&worker, "--metrics"))
    );
    // The image runs as a user, not root.
    let dockerfile = std::fs::read_to_string(repo_root().join("deploy/Dockerfile")).unwrap();
    let user = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER");
    assert!(
        !user.starts_with("0") && !user.starts_with("root"),
        "USER {user}"
    );
}
