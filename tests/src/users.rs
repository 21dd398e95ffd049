//! Throw-away users on the shared RabbitMQ and Redis: created with the
//! permissions a test gives them, deleted when dropped (also when the test
//! panics), so a rerun on the same servers starts clean.

use std::process::Command;

use flota_shared::store::redis;

/// Run `rabbitmqctl`, failing clearly when it is missing or refuses.
pub fn rabbitmqctl(args: &[&str]) -> Result<(), String> {
    let out = Command::new("rabbitmqctl").args(args).output().map_err(|e| {
        format!("`rabbitmqctl` is required for this test (RabbitMQ user management) and cannot run: {e}")
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "rabbitmqctl {} failed ({}): {}{}",
            args.first().copied().unwrap_or(""),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A RabbitMQ user on vhost `/`.
pub struct RabbitUser {
    name: String,
    password: String,
}

impl RabbitUser {
    /// `permissions` are the configure, write and read regexes.
    pub fn create(name: String, password: &str, permissions: [&str; 3]) -> RabbitUser {
        rabbitmqctl(&["add_user", &name, password]).unwrap_or_else(|e| panic!("{e}"));
        let user = RabbitUser { name, password: password.to_string() };
        let [configure, write, read] = permissions;
        rabbitmqctl(&["set_permissions", "-p", "/", &user.name, configure, write, read])
            .unwrap_or_else(|e| panic!("{e}"));
        user
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its URL on the local broker.
    pub fn url(&self) -> String {
        format!("amqp://{}:{}@127.0.0.1:5672/%2f", self.name, self.password)
    }
}

impl Drop for RabbitUser {
    fn drop(&mut self) {
        if let Err(e) = rabbitmqctl(&["delete_user", &self.name]) {
            eprintln!("could not delete RabbitMQ user {}: {e}", self.name);
        }
    }
}

/// A Redis ACL user, created through `admin_url`.
pub struct RedisUser {
    admin_url: String,
    name: String,
    password: String,
}

impl RedisUser {
    /// `rules` are `ACL SETUSER`'s after the name, the password (`>password`)
    /// among them; `password` is for [`RedisUser::url`].
    pub async fn create(admin_url: &str, name: String, password: &str, rules: &[String]) -> RedisUser {
        let user = RedisUser { admin_url: admin_url.to_string(), name, password: password.to_string() };
        let client = redis::Client::open(admin_url).expect("admin client");
        let mut admin = client.get_multiplexed_async_connection().await.expect("admin connection");
        let mut setuser = redis::cmd("ACL");
        setuser.arg("SETUSER").arg(&user.name).arg(rules);
        let _: () =
            setuser.query_async(&mut admin).await.expect("ACL SETUSER (the shared Redis must allow ACL)");
        user
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its URL on the local Redis.
    pub fn url(&self) -> String {
        format!("redis://{}:{}@127.0.0.1:6379/0", self.name, self.password)
    }
}

impl Drop for RedisUser {
    fn drop(&mut self) {
        let deleted = redis::Client::open(self.admin_url.as_str())
            .and_then(|c| c.get_connection())
            .and_then(|mut c| redis::cmd("ACL").arg("DELUSER").arg(&self.name).query::<i64>(&mut c));
        if let Err(e) = deleted {
            eprintln!("could not delete Redis ACL user {}: {e}", self.name);
        }
    }
}

/// The runbook's `unroutable` policy on a test's `P.tasks`: its alternate
/// exchange is `P.dlx`. Removed when dropped (also when the test panics).
pub struct UnroutablePolicy(String);

impl UnroutablePolicy {
    pub fn set(env: &crate::TestEnv) -> UnroutablePolicy {
        let policy = UnroutablePolicy(format!("{}-unroutable", env.prefix));
        let pattern = format!("^{}$", env.topo.tasks_exchange().replace('.', "\\."));
        let definition =
            serde_json::json!({"alternate-exchange": env.topo.dead_letter_exchange()}).to_string();
        rabbitmqctl(&[
            "set_policy",
            "--apply-to",
            "exchanges",
            "--priority",
            "100",
            &policy.0,
            &pattern,
            &definition,
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        policy
    }
}

impl Drop for UnroutablePolicy {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["clear_policy", &self.0]);
    }
}
