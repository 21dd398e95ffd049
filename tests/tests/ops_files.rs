//! The operations files, checked statically (there is no Docker engine here):
//! Prometheus config and alert rules pass `promtool`, every file compose and
//! Grafana reference exists, every `FLOTA_*` variable they set is one the code
//! reads, and every alert links a runbook that exists.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// `FLOTA_*` names appearing in a text.
fn flota_vars(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("FLOTA_") {
        let start = i + pos;
        let mut end = start + "FLOTA_".len();
        while end < bytes.len()
            && (bytes[end].is_ascii_uppercase() || bytes[end].is_ascii_digit() || bytes[end] == b'_')
        {
            end += 1;
        }
        out.insert(text[start..end].to_string());
        i = end;
    }
    out
}

#[test]
fn promtool_accepts_config_and_rules() {
    let promtool =
        which("promtool").expect("promtool missing: ops/test.sh installs Debian's `prometheus` package");
    let rules = Command::new(&promtool)
        .arg("check")
        .arg("rules")
        .arg(root().join("ops/prometheus/alerts.yml"))
        .output()
        .unwrap();
    assert!(
        rules.status.success(),
        "{}",
        String::from_utf8_lossy(&rules.stdout) + String::from_utf8_lossy(&rules.stderr)
    );
    let config = Command::new(&promtool)
        .arg("check")
        .arg("config")
        .arg("--syntax-only")
        .arg(root().join("ops/prometheus/prometheus.yml"))
        .output()
        .unwrap();
    assert!(
        config.status.success(),
        "{}",
        String::from_utf8_lossy(&config.stdout) + String::from_utf8_lossy(&config.stderr)
    );
}

#[test]
fn every_alert_has_a_runbook_and_the_extra_runbooks_exist() {
    let alerts = read("ops/prometheus/alerts.yml");
    let mut n = 0;
    for line in alerts.lines().filter(|l| l.trim_start().starts_with("runbook:")) {
        let path = line.split_once(':').unwrap().1.trim();
        assert!(root().join(path).is_file(), "runbook {path} missing");
        n += 1;
    }
    assert_eq!(n, alerts.matches("- alert:").count(), "one runbook per alert");
    for extra in ["ops/runbooks/interpreter-detects-nothing.md", "ops/runbooks/inconsistent-task.md"] {
        assert!(root().join(extra).is_file(), "{extra}");
    }
}

#[test]
fn compose_and_k8s_reference_real_files_and_variables() {
    let config_rs = read("shared/src/config.rs") + &read("worker/src/main.rs");
    let known = flota_vars(&config_rs);
    for file in ["docker-compose.yml", "ops/k8s/worker.yaml", "ops/k8s/scheduler.yaml", "README.md"] {
        let text = read(file);
        for var in flota_vars(&text) {
            assert!(known.contains(&var), "{file} uses {var}, which no Flota process reads");
        }
    }
    let compose = read("docker-compose.yml");
    for line in compose.lines() {
        let t = line.trim().trim_start_matches("- ");
        if let Some(rest) = t.strip_prefix("./") {
            let path = rest.split(':').next().unwrap();
            assert!(root().join(path).exists(), "compose references ./{path}, which does not exist");
        }
    }
    assert!(root().join("Dockerfile").is_file());
    for provisioning in [
        "ops/grafana/provisioning/dashboards/flota.yml",
        "ops/grafana/provisioning/datasources/prometheus.yml",
    ] {
        assert!(root().join(provisioning).is_file());
    }
    for dashboard in ["ops/grafana/dashboards/fleet.json", "ops/grafana/dashboards/wes.json"] {
        let v: serde_json::Value = serde_json::from_str(&read(dashboard)).expect("dashboard JSON");
        assert!(!v["panels"].as_array().unwrap().is_empty());
    }
}

#[test]
fn the_contract_metric_names_are_the_ones_the_worker_exports() {
    let metrics = read("worker/src/metrics.rs");
    for name in [
        "wes_works_opened",
        "wes_interpreter_latency_seconds",
        "wes_proposals_accepted",
        "wes_semantic_confirmations",
    ] {
        assert!(metrics.contains(&format!("\"{name}\"")), "{name}");
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}
