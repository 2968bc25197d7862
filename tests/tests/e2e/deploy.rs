//! The deployment files, checked as far as a machine without a Docker engine can: the compose
//! file parses and its services are wired right, and every binary, flag, path, port and
//! environment variable that it and the Dockerfile name exists and matches the code.

use std::collections::BTreeSet;
use std::process::Command;

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
        repo_root().join("coordinator/src"),
        repo_root().join("worker/src"),
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
