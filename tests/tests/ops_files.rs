//! The operations files, checked statically (there is no Docker engine here):
//! Prometheus config and alert rules pass `promtool`, every file compose and
//! Grafana reference exists (bind mounts in short and long syntax, build
//! contexts and Dockerfiles, `env_file`, and the COPY/ADD sources of every
//! Dockerfile compose builds), every `FLOTA_*` variable they set is one the
//! code reads, every alert links a runbook that exists, and the Kubernetes
//! manifests probe routes the binaries serve, outlast the drain and scale on
//! the real work queues.

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
    let compose = read("docker-compose.yml");
    let checked = compose_references(&root(), &compose);
    assert!(
        checked.problems.is_empty(),
        "docker-compose.yml references what is not in the repository:\n{}",
        checked.problems.join("\n")
    );
    // The parser saw every form compose uses today (so a silent parse miss cannot pass).
    for path in [
        "ops/prometheus/prometheus.yml",
        "ops/prometheus/alerts.yml",
        "ops/grafana/provisioning",
        "ops/grafana/dashboards",
        "ops/otel/config.yaml",
        "Dockerfile",
        "shared",
        "Cargo.lock",
    ] {
        assert!(
            checked.paths.contains(path),
            "the compose check never looked at {path}: {:?}",
            checked.paths
        );
    }
    assert!(checked.named_volumes.contains("redis-data"), "{:?}", checked.named_volumes);

    // Every FLOTA_* variable set by compose, the images it builds, the k8s
    // manifests and the README is one a Flota process reads.
    let mut files: Vec<String> = ["docker-compose.yml", "README.md"].map(String::from).to_vec();
    files.extend(checked.dockerfiles.iter().cloned());
    let mut manifests: Vec<String> = std::fs::read_dir(root().join("ops/k8s"))
        .expect("ops/k8s")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .map(|n| format!("ops/k8s/{n}"))
        .collect();
    manifests.sort();
    assert!(manifests.iter().any(|m| m == "ops/k8s/worker.yaml"), "{manifests:?}");
    assert!(manifests.iter().any(|m| m == "ops/k8s/scheduler.yaml"), "{manifests:?}");
    files.extend(manifests);
    for file in &files {
        let text = read(file);
        for var in flota_vars(&text) {
            assert!(known.contains(&var), "{file} uses {var}, which no Flota process reads");
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

/// The checker itself, on a compose file and Dockerfile written to fail in
/// every form it knows: each missing path is named, nothing that exists is.
#[test]
fn the_compose_check_names_every_missing_path() {
    let dir = std::env::temp_dir().join(format!("flota-ops-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for d in ["app", "conf", "ctx"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    for f in ["conf/present.yml", "ctx/main.rs", "present.env"] {
        std::fs::write(dir.join(f), "").unwrap();
    }
    std::fs::write(
        dir.join("app/Dockerfile"),
        "FROM rust AS build\n\
         COPY Cargo.toml \\\n     missing-lock ./\n\
         # COPY commented-out ./\n\
         COPY --chown=1:1 [\"Dockerfile\", \"missing-json\", \"/src/\"]\n\
         ADD https://example.com/x.tar.gz missing-add /src/\n\
         copy --from=build /src/target/release/flota-worker /usr/local/bin/\n\
         COPY --link missing-*.rs ./\n\
         COPY Docker* ./\n",
    )
    .unwrap();
    std::fs::write(dir.join("app/Cargo.toml"), "").unwrap();
    std::fs::write(dir.join("ctx/Custom.Dockerfile"), "FROM scratch\nCOPY main.rs nothing-here /\n").unwrap();
    let compose = r#"
services:
  a:
    build: ./app
    env_file: present.env
    volumes:
      - ./conf/present.yml:/etc/present.yml:ro
      - ./conf/missing-short.yml:/etc/x.yml:ro   # a comment
      - "./missing-quoted:/q"
      - named:/data
      - undeclared:/data2
      - /var/run/docker.sock:/var/run/docker.sock
      - /anonymous
      - type: bind
        source: ./missing-long
        target: /l
      - type: volume
        source: named
        target: /v
  b:
    build: {context: ./ctx, dockerfile: Custom.Dockerfile}
    env_file: [present.env, ./missing-flow.env]
    volumes: ["./missing-flow-volume:/f:ro", "./conf:/conf"]
  c:
    build:
      context: ./missing-context
    env_file:
      - ./missing-block.env
      - path: ./missing-long.env
      - path: ./optional.env
        required: false
  d:
    build:
      context: ./app
      dockerfile: missing.Dockerfile
    healthcheck:
      test: |
        ./not-a-reference.sh
configs:
  c1:
    file: ./missing-config
volumes:
  named: {}
"#;
    let checked = compose_references(&dir, compose);
    let report = checked.problems.join("\n");
    std::fs::remove_dir_all(&dir).unwrap();
    for missing in [
        "./conf/missing-short.yml",
        "./missing-quoted",
        "undeclared",
        "./missing-long",
        "./missing-flow.env",
        "./missing-flow-volume",
        "./missing-context",
        "./missing-block.env",
        "./missing-long.env",
        "missing.Dockerfile",
        "./missing-config",
        "missing-lock",
        "missing-json",
        "missing-add",
        "missing-*.rs",
        "nothing-here",
    ] {
        assert!(report.contains(&format!("{missing} ")), "{missing} not reported:\n{report}");
    }
    assert_eq!(checked.problems.len(), 16, "{report}");
    for fine in [
        "present",
        "named:",
        "docker.sock",
        "anonymous",
        "example.com",
        "flota-worker",
        "Docker*",
        "optional",
        "commented",
        "not-a-reference",
    ] {
        assert!(!report.contains(fine), "{fine} reported:\n{report}");
    }
}

/// What [`compose_references`] found: the problems, and what it checked.
#[derive(Default)]
struct ComposeCheck {
    problems: Vec<String>,
    /// Paths checked, relative to the compose file's directory, without `./`.
    paths: BTreeSet<String>,
    named_volumes: BTreeSet<String>,
    /// The Dockerfiles built, relative to the compose file's directory.
    dockerfiles: Vec<String>,
}

impl ComposeCheck {
    fn path(&mut self, base: &Path, at: &str, what: &str, path: &str) {
        let rel = normalize(path);
        if !base.join(&rel).exists() {
            self.problems.push(format!("{at} {what}: {path} does not exist"));
        }
        self.paths.insert(rel);
    }
}

fn normalize(path: &str) -> String {
    let p = path.trim_start_matches("./");
    if p.is_empty() || p == "." { ".".into() } else { p.trim_end_matches('/').to_string() }
}

/// Every host path a compose file names (bind mounts, short and long syntax;
/// build contexts and Dockerfiles; `env_file`; `configs`/`secrets`/`extends`
/// files), each checked against `base`, plus the COPY/ADD sources of every
/// Dockerfile it builds, checked against that build's context.
fn compose_references(base: &Path, compose: &str) -> ComposeCheck {
    let scalars = yaml_scalars(compose);
    let mut check = ComposeCheck::default();
    let declared: BTreeSet<&str> = scalars
        .iter()
        .filter(|s| s.path.len() >= 2 && s.path[0] == "volumes")
        .map(|s| s.path[1].as_str())
        .collect();
    // The value of `key` in the same list item / mapping as `s`.
    let sibling = |s: &Scalar, key: &str| -> Option<String> {
        let parent = &s.path[..s.path.len() - 1];
        scalars
            .iter()
            .find(|o| {
                o.path.len() == s.path.len()
                    && o.path[..parent.len()] == *parent
                    && o.path.last().unwrap() == key
            })
            .map(|o| o.value.clone())
    };
    let mut builds: Vec<(String, String, Option<String>, String)> = Vec::new(); // service, context, dockerfile, where
    // An empty value is a key whose mapping or list follows: its entries are checked instead.
    for s in scalars.iter().filter(|s| !s.value.is_empty()) {
        let p: Vec<&str> = s.path.iter().map(String::as_str).collect();
        let at = format!("line {}", s.line);
        let item = |seg: &str| seg.starts_with('[');
        match p.as_slice() {
            ["services", svc, "volumes", i] if item(i) => {
                let what = format!("services.{svc}.volumes");
                match s.value.split_once(':') {
                    Some((src, _)) if src.starts_with('.') => check.path(base, &at, &what, src),
                    Some((src, _)) if src.starts_with('/') || src.starts_with('~') => {} // outside the repo
                    Some((src, _)) => {
                        if !declared.contains(src) {
                            check.problems.push(format!("{at} {what}: {src} is not a declared volume"));
                        }
                        check.named_volumes.insert(src.to_string());
                    }
                    None => {} // an anonymous volume: a container path only
                }
            }
            ["services", svc, "volumes", i, "source"] if item(i) => {
                let what = format!("services.{svc}.volumes (long syntax)");
                match sibling(s, "type").as_deref() {
                    Some("bind") if !s.value.starts_with('/') && !s.value.starts_with('~') => {
                        check.path(base, &at, &what, &s.value)
                    }
                    Some("volume") => {
                        if !declared.contains(s.value.as_str()) {
                            check.problems.push(format!("{at} {what}: {} is not a declared volume", s.value));
                        }
                        check.named_volumes.insert(s.value.clone());
                    }
                    _ => {}
                }
            }
            ["services", svc, "build"] => builds.push((svc.to_string(), s.value.clone(), None, at)),
            ["services", svc, "build", "context"] => {
                builds.push((svc.to_string(), s.value.clone(), sibling(s, "dockerfile"), at))
            }
            ["services", svc, "build", "dockerfile"] if sibling(s, "context").is_none() => {
                builds.push((svc.to_string(), ".".into(), Some(s.value.clone()), at))
            }
            ["services", svc, "env_file"] => {
                check.path(base, &at, &format!("services.{svc}.env_file"), &s.value)
            }
            ["services", svc, "env_file", i] if item(i) => {
                check.path(base, &at, &format!("services.{svc}.env_file"), &s.value)
            }
            ["services", svc, "env_file", i, "path"]
                if item(i) && sibling(s, "required").as_deref() != Some("false") =>
            {
                check.path(base, &at, &format!("services.{svc}.env_file"), &s.value)
            }
            ["services", svc, "extends", "file"] => {
                check.path(base, &at, &format!("services.{svc}.extends"), &s.value)
            }
            [top @ ("configs" | "secrets"), name, "file"] => {
                check.path(base, &at, &format!("{top}.{name}"), &s.value)
            }
            _ => {}
        }
    }
    for (svc, context, dockerfile, at) in builds {
        if context.contains("://") || context.starts_with("git@") {
            continue; // a remote context
        }
        let what = format!("services.{svc}.build");
        let problems = check.problems.len();
        check.path(base, &at, &format!("{what} context"), &context);
        if check.problems.len() > problems {
            continue; // no context, so no Dockerfile to read
        }
        let dockerfile = dockerfile.unwrap_or_else(|| "Dockerfile".into());
        let ctx = normalize(&context);
        let rel =
            if ctx == "." { normalize(&dockerfile) } else { format!("{ctx}/{}", normalize(&dockerfile)) };
        if check.dockerfiles.contains(&rel) {
            continue; // another service builds the same image: checked once
        }
        let Ok(text) = std::fs::read_to_string(base.join(&rel)) else {
            check.problems.push(format!("{at} {what} dockerfile: {dockerfile} does not exist in {context}"));
            continue;
        };
        check.paths.insert(rel.clone());
        for (line, src) in dockerfile_sources(&text) {
            let src_rel = normalize(src.trim_start_matches('/'));
            let found = if src_rel.contains(['*', '?']) {
                glob_exists(&base.join(&ctx), &src_rel)
            } else {
                base.join(&ctx).join(&src_rel).exists()
            };
            if !found {
                check.problems.push(format!(
                    "{rel}:{line} (built for services.{svc}): COPY/ADD source {src} does not exist in the context {context}"
                ));
            }
            check.paths.insert(if ctx == "." { src_rel } else { format!("{ctx}/{src_rel}") });
        }
        check.dockerfiles.push(rel);
    }
    check
}

/// The sources of a Dockerfile's COPY and ADD instructions, with their line;
/// copies from another stage or image (`--from=`), URLs and heredocs are skipped.
fn dockerfile_sources(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut instruction = String::new();
    let mut start = 0;
    for (n, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('#') || (instruction.is_empty() && t.is_empty()) {
            continue;
        }
        if instruction.is_empty() {
            start = n + 1;
        }
        if let Some(cont) = t.strip_suffix('\\') {
            instruction.push_str(cont);
            instruction.push(' ');
            continue;
        }
        instruction.push_str(t);
        let whole = std::mem::take(&mut instruction);
        let Some((op, args)) = whole.split_once(char::is_whitespace) else { continue };
        let add = op.eq_ignore_ascii_case("ADD");
        if !add && !op.eq_ignore_ascii_case("COPY") {
            continue;
        }
        let mut args = args.trim();
        let mut from_stage = false;
        while let Some(flag) = args.strip_prefix("--") {
            let (name, rest) = flag.split_once(char::is_whitespace).unwrap_or((flag, ""));
            from_stage |= name.starts_with("from=");
            args = rest.trim_start();
        }
        if from_stage || args.contains("<<") {
            continue;
        }
        let words: Vec<String> = if args.starts_with('[') {
            serde_json::from_str(args).unwrap_or_else(|e| panic!("line {start}: bad JSON form {args}: {e}"))
        } else {
            args.split_whitespace().map(String::from).collect()
        };
        let Some((_dest, sources)) = words.split_last() else { continue };
        for src in sources {
            if add && (src.contains("://") || src.starts_with("git@")) {
                continue;
            }
            out.push((start, src.clone()));
        }
    }
    out
}

/// Whether a `*`/`?` pattern (relative, `/`-separated) matches anything under `dir`.
fn glob_exists(dir: &Path, pattern: &str) -> bool {
    let (first, rest) = pattern.split_once('/').unwrap_or((pattern, ""));
    let matches: Vec<PathBuf> = if first.contains(['*', '?']) {
        let Ok(entries) = std::fs::read_dir(dir) else { return false };
        entries
            .filter_map(Result::ok)
            .filter(|e| wildcard(first.as_bytes(), e.file_name().to_string_lossy().as_bytes()))
            .map(|e| e.path())
            .collect()
    } else {
        vec![dir.join(first)]
    };
    matches.iter().any(|m| if rest.is_empty() { m.exists() } else { glob_exists(m, rest) })
}

fn wildcard(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.first(), name.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            wildcard(&pattern[1..], name) || (!name.is_empty() && wildcard(pattern, &name[1..]))
        }
        (Some(b'?'), Some(_)) => wildcard(&pattern[1..], &name[1..]),
        (Some(p), Some(c)) if p == c => wildcard(&pattern[1..], &name[1..]),
        _ => false,
    }
}

/// One scalar of a YAML document and the keys leading to it; a list item's
/// segment is `[n]` (`n` unique per item). Keys with no value (a mapping or
/// list follows, or nothing) appear with an empty value.
#[derive(Debug)]
struct Scalar {
    path: Vec<String>,
    value: String,
    line: usize,
}

/// The YAML subset compose and k8s files use, by plain string parsing: block
/// mappings and lists, one-line (or bracket-balanced multi-line) flow
/// collections, quoted scalars, comments, anchors and `<<` merges (skipped),
/// block scalars (skipped: they are text, not references).
fn yaml_scalars(text: &str) -> Vec<Scalar> {
    let lines: Vec<String> = text.lines().map(strip_comment).collect();
    let mut out = Vec::new();
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut items = 0;
    let mut n = 0;
    while n < lines.len() {
        let line = n + 1;
        let raw = lines[n].trim_end();
        n += 1;
        if raw.trim().is_empty() {
            continue;
        }
        if raw == "---" || raw == "..." {
            stack.clear();
            continue;
        }
        let mut indent = raw.len() - raw.trim_start().len();
        let mut rest = raw.trim_start().to_string();
        while rest == "-" || rest.starts_with("- ") {
            while stack.last().is_some_and(|(i, seg)| *i > indent || (*i == indent && seg.starts_with('['))) {
                stack.pop();
            }
            items += 1;
            stack.push((indent, format!("[{items}]")));
            let after = rest.get(2..).unwrap_or("");
            indent += 2 + (after.len() - after.trim_start().len());
            rest = after.trim_start().to_string();
        }
        if rest.is_empty() {
            continue;
        }
        let (key, mut value) = match split_key(&rest) {
            Some((k, v)) => (Some(k), v),
            None => (None, rest.clone()),
        };
        if let Some(k) = &key {
            while stack.last().is_some_and(|(i, _)| *i >= indent) {
                stack.pop();
            }
            if k == "<<" {
                continue;
            }
        }
        let mut path: Vec<String> = stack.iter().map(|(_, s)| s.clone()).collect();
        path.extend(key.clone());
        if let Some(anchored) = value.strip_prefix('&') {
            value = anchored.split_once(char::is_whitespace).map_or("", |(_, v)| v).trim().to_string();
        }
        if value.starts_with('|') || value.starts_with('>') {
            // A block scalar: its lines are deeper than the key (or blank).
            while n < lines.len() {
                let l = &lines[n];
                if !l.trim().is_empty() && l.len() - l.trim_start().len() <= indent {
                    break;
                }
                n += 1;
            }
            continue;
        }
        if value.starts_with('[') || value.starts_with('{') {
            while flow_depth(&value) > 0 && n < lines.len() {
                value.push(' ');
                value.push_str(lines[n].trim());
                n += 1;
            }
            let chars: Vec<char> = value.chars().collect();
            let mut at = 0;
            flatten(&flow(&chars, &mut at), path, line, &mut out, &mut items);
            continue;
        }
        if value.starts_with('*') {
            continue; // an alias: checked where the anchor is
        }
        if value.is_empty()
            && let Some(k) = key
        {
            stack.push((indent, k));
        }
        out.push(Scalar { path, value: unquote(&value), line });
    }
    out
}

/// A line without its comment (`#` at the start or after a space, outside quotes).
fn strip_comment(line: &str) -> String {
    let mut quote = None;
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') if prev.is_whitespace() => return line[..i].to_string(),
            _ => {}
        }
        prev = c;
    }
    line.to_string()
}

/// `key: value` (or `key:`), the colon outside quotes and brackets and followed by a space.
fn split_key(s: &str) -> Option<(String, String)> {
    if s.starts_with(['[', '{', '"', '\'']) && !s.starts_with("\"") && !s.starts_with('\'') {
        return None;
    }
    let bytes = s.as_bytes();
    let mut quote = None;
    for (i, &b) in bytes.iter().enumerate() {
        match (quote, b) {
            (None, b'"' | b'\'') if i == 0 => quote = Some(b),
            (Some(q), b) if b == q => quote = None,
            (None, b':') if bytes.get(i + 1).is_none_or(|c| *c == b' ') => {
                return Some((unquote(s[..i].trim()), s[i + 1..].trim().to_string()));
            }
            (None, b'[' | b'{' | b'"' | b'\'') => return None,
            _ => {}
        }
    }
    None
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    for q in ['"', '\''] {
        if s.len() >= 2 && s.starts_with(q) && s.ends_with(q) {
            return s[1..s.len() - 1].to_string();
        }
    }
    s.to_string()
}

/// How many flow brackets are still open at the end of `s`.
fn flow_depth(s: &str) -> i32 {
    let mut depth = 0;
    let mut quote = None;
    for c in s.chars() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '[' | '{') => depth += 1,
            (None, ']' | '}') => depth -= 1,
            _ => {}
        }
    }
    depth
}

enum Node {
    Scalar(String),
    Seq(Vec<Node>),
    Map(Vec<(String, Node)>),
}

/// A flow collection or scalar starting at `chars[*at]`.
fn flow(chars: &[char], at: &mut usize) -> Node {
    let skip_ws = |at: &mut usize| {
        while chars.get(*at).is_some_and(|c| c.is_whitespace()) {
            *at += 1;
        }
    };
    skip_ws(at);
    let close = match chars.get(*at) {
        Some('[') => ']',
        Some('{') => '}',
        _ => return Node::Scalar(flow_scalar(chars, at)),
    };
    *at += 1;
    let (mut seq, mut map) = (Vec::new(), Vec::new());
    loop {
        skip_ws(at);
        match chars.get(*at) {
            None => break,
            Some(c) if *c == close => {
                *at += 1;
                break;
            }
            Some(',') => {
                *at += 1;
                continue;
            }
            _ => {}
        }
        let before = *at;
        if close == '}' {
            let key = flow_scalar(chars, at);
            skip_ws(at);
            let value = if chars.get(*at) == Some(&':') {
                *at += 1;
                flow(chars, at)
            } else {
                Node::Scalar(String::new())
            };
            map.push((key, value));
        } else {
            seq.push(flow(chars, at));
        }
        if *at == before {
            *at += 1; // never loop on a character nothing accepts
        }
    }
    if close == '}' { Node::Map(map) } else { Node::Seq(seq) }
}

/// A quoted scalar, or a plain one up to `,`, a closing bracket, or `: `.
fn flow_scalar(chars: &[char], at: &mut usize) -> String {
    if let Some(&q @ ('"' | '\'')) = chars.get(*at) {
        let start = *at + 1;
        *at = start;
        while chars.get(*at).is_some_and(|c| *c != q) {
            *at += 1;
        }
        let s: String = chars[start..(*at).min(chars.len())].iter().collect();
        *at += 1;
        return s;
    }
    let start = *at;
    while let Some(&c) = chars.get(*at) {
        let colon_ends =
            c == ':' && chars.get(*at + 1).is_none_or(|n| n.is_whitespace() || ",]}".contains(*n));
        if ",]}".contains(c) || colon_ends {
            break;
        }
        *at += 1;
    }
    chars[start..*at].iter().collect::<String>().trim().to_string()
}

fn flatten(node: &Node, path: Vec<String>, line: usize, out: &mut Vec<Scalar>, items: &mut usize) {
    match node {
        Node::Scalar(v) => out.push(Scalar { path, value: v.clone(), line }),
        Node::Seq(v) if v.is_empty() => out.push(Scalar { path, value: String::new(), line }),
        Node::Map(v) if v.is_empty() => out.push(Scalar { path, value: String::new(), line }),
        Node::Seq(v) => {
            for n in v {
                *items += 1;
                let mut p = path.clone();
                p.push(format!("[{items}]"));
                flatten(n, p, line, out, items);
            }
        }
        Node::Map(v) => {
            for (k, n) in v {
                let mut p = path.clone();
                p.push(k.clone());
                flatten(n, p, line, out, items);
            }
        }
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

/// The first value after `key:` on any line of a manifest (flow or block style).
fn manifest_values<'a>(text: &'a str, key: &str) -> Vec<&'a str> {
    let needle = format!("{key}:");
    text.lines()
        .filter_map(|l| {
            let at = l.find(&needle)?;
            let rest = l[at + needle.len()..].trim_start();
            let end = rest.find([',', '}', '#']).unwrap_or(rest.len());
            Some(rest[..end].trim().trim_matches('"'))
        })
        .filter(|v| !v.is_empty())
        .collect()
}

/// The Kubernetes manifests: probes on routes the binaries serve, a
/// termination grace longer than the drain, and KEDA scaling the worker
/// Deployment on the queues its prefix really has.
#[test]
fn k8s_probes_grace_and_scaling_match_the_binaries() {
    let worker = read("ops/k8s/worker.yaml");
    let scheduler = read("ops/k8s/scheduler.yaml");
    let keda = read("ops/k8s/keda-scaledobject.yaml");
    let worker_routes = read("worker/src/http.rs");
    let scheduler_routes = read("scheduler/src/http.rs");
    for (name, manifest, routes) in
        [("worker", &worker, &worker_routes), ("scheduler", &scheduler, &scheduler_routes)]
    {
        for probe in ["livenessProbe", "readinessProbe"] {
            assert!(manifest.contains(&format!("{probe}:")), "{name} has a {probe}");
        }
        let paths = manifest_values(manifest, "path");
        assert!(paths.len() >= 2, "{name}'s probes name their paths: {paths:?}");
        for path in paths {
            assert!(routes.contains(&format!("\"{path}\"")), "{name} serves its probe path {path}");
        }
        // The pod is killed only after the drain's grace has run out, with a margin.
        let grace: u64 = manifest_values(manifest, "terminationGracePeriodSeconds")
            .first()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} sets terminationGracePeriodSeconds"));
        let drain: u64 = manifest
            .lines()
            .find(|l| l.contains("FLOTA_SHUTDOWN_GRACE"))
            .and_then(|l| manifest_values(l, "value").first().and_then(|v| v.parse().ok()))
            .unwrap_or(30);
        assert!(grace >= drain + 10, "{name}: termination grace {grace} s must exceed the drain {drain} s");
    }
    let prefix = worker
        .lines()
        .find(|l| l.contains("FLOTA_PREFIX"))
        .and_then(|l| manifest_values(l, "value").first().map(|v| v.to_string()))
        .expect("the worker sets FLOTA_PREFIX");
    let worker_name = manifest_values(&worker, "name")[0];
    assert_eq!(worker_name, "flota-worker");
    let target = keda.split("scaleTargetRef:").nth(1).expect("KEDA names its target");
    assert_eq!(manifest_values(target, "name").first().copied(), Some(worker_name), "KEDA scales the worker");
    let topo = flota_shared::amqp::Topology::new(&prefix);
    let queues = manifest_values(&keda, "queueName");
    assert!(!queues.is_empty(), "KEDA triggers on queues");
    for q in &queues {
        let known = [flota_shared::envelope::Kind::Interpret, flota_shared::envelope::Kind::Deliberate]
            .map(|k| topo.work_queue(k));
        assert!(known.iter().any(|k| k == q), "KEDA's queue {q} is one of {prefix}'s work queues: {known:?}");
    }
}

/// The worker and the scheduler both export the `wes_*` metrics (each replica
/// its own; the scheduler fleet-wide, from the results), and Prometheus scrapes
/// both: a query that does not pick one job counts every interpretation twice,
/// and sums two histograms with different buckets.
#[test]
fn every_wes_query_reads_one_job_only() {
    let prometheus = read("ops/prometheus/prometheus.yml");
    assert!(prometheus.contains("job_name: flota-worker"), "the job the queries select is scraped");
    let mut queries = 0;
    for file in
        ["ops/grafana/dashboards/wes.json", "ops/grafana/dashboards/fleet.json", "ops/prometheus/alerts.yml"]
    {
        for (n, line) in read(file).lines().enumerate() {
            // Each selector of a wes_ series on the line, up to its range or the line's end.
            for (at, _) in line.match_indices("wes_") {
                queries += 1;
                let selector = line[at..].split(['[', ')']).next().unwrap_or_default();
                assert!(
                    selector.contains("job=\\\"flota-worker\\\"")
                        || selector.contains("job=\"flota-worker\""),
                    "{file}:{}: `{selector}` adds the worker's and the scheduler's series together",
                    n + 1
                );
            }
        }
    }
    assert!(queries >= 6, "the WES dashboard and the latency alert were found ({queries} selectors)");
}
