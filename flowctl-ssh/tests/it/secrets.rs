//! Secrets stay out of tracing: a span of a remote process records its
//! command line only when `SshConfig::log_commands` is set.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use flowctl_ssh::Session;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

use crate::fixture::Fixture;

/// Records the name and fields of every span and event, as text.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<String>>>,
    next: Arc<AtomicU64>,
}

struct Text(String);

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!(" {}={value:?}", field.name()));
    }
}

impl Recorder {
    fn push(&self, text: String) {
        self.seen.lock().unwrap().push(text);
    }

    fn all(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

impl Subscriber for Recorder {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let mut t = Text(format!("span {}", span.metadata().name()));
        span.record(&mut t);
        self.push(t.0);
        Id::from_u64(self.next.fetch_add(1, Ordering::Relaxed) + 1)
    }
    fn record(&self, _: &Id, values: &Record<'_>) {
        let mut t = Text("record".into());
        values.record(&mut t);
        self.push(t.0);
    }
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut t = Text(format!("event {}", event.metadata().target()));
        event.record(&mut t);
        self.push(t.0);
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

async fn run(fx: &Fixture, log_commands: bool) -> Vec<String> {
    let recorder = Recorder::default();
    let _guard = tracing::subscriber::set_default(recorder.clone());
    let s = Session::connect(fx.config().log_commands(log_commands))
        .await
        .unwrap();
    let mut p = s.exec("echo pw-TOPSECRET-7 >/dev/null").await.unwrap();
    assert!(p.wait().await.unwrap().success());
    drop(p);
    s.close().await;
    recorder.all()
}

#[tokio::test]
async fn exec_spans_do_not_carry_the_command_unless_opted_in() {
    let fx = Fixture::embedded().await;
    let seen = run(&fx, false).await;
    let leaks: Vec<_> = seen.iter().filter(|l| l.contains("TOPSECRET")).collect();
    assert!(leaks.is_empty(), "command line in tracing: {leaks:#?}");
    assert!(
        seen.iter()
            .any(|l| l.starts_with("span flowctl.ssh.exec") && l.contains("command_len=")),
        "no exec span recorded: {seen:#?}"
    );

    let seen = run(&fx, true).await;
    assert!(
        seen.iter()
            .any(|l| l.starts_with("span flowctl.ssh.exec") && l.contains("TOPSECRET")),
        "log_commands(true) did not record the command: {seen:#?}"
    );
}
