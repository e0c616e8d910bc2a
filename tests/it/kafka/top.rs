//! `sluice top` on a terminal (tmux) over two worker processes of one consumer group.

use std::process::Command;
use std::time::{Duration, Instant};

use super::{Broker, Sluice, events, source_yaml, wait_assigned, write_pipeline};
use crate::free_port;

/// tmux on a server of its own (`-L`), so the test touches no other session.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("tmux (`make test` installs it)");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            crate::text(&out.stderr)
        );
        crate::text(&out.stdout)
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "top"])
    }

    fn alternate_screen(&self) -> bool {
        self.run(&["display-message", "-p", "-t", "top", "#{alternate_on}"])
            .trim()
            == "1"
    }

    /// Waits until the screen shows `what`; the screen.
    fn wait_for(&self, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let screen = self.screen();
            if screen.contains(what) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "no `{what}` on the screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

#[test]
fn top_in_tmux_shows_both_workers_and_quits_restoring_the_terminal() {
    let broker = Broker::start();
    let input = broker.name("views");
    broker.create_topic(&input, 4);
    broker.produce(&input, &events(20_000, 4));
    let dir = tempfile::tempdir().unwrap();
    let path = write_pipeline(
        dir.path(),
        &format!(
            "name: watched\n{}stages:\n  - name: shout\n    type: sql\n    query: SELECT id, upper(country) AS country FROM input\nsink: {{ type: null }}\ncheckpoint: {{ dir: {}, interval: 1s }}\n",
            source_yaml(&broker, &input, &broker.name("g")),
            dir.path().join("ckpt").display()
        ),
    );
    let addrs: Vec<String> = (0..2)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let mut workers: Vec<Sluice> = ["a", "b"]
        .iter()
        .zip(&addrs)
        .map(|(member, addr)| {
            Sluice::spawn(
                &[
                    "worker",
                    path.to_str().unwrap(),
                    "--member",
                    member,
                    "--metrics-addr",
                    addr,
                ],
                dir.path().join(format!("log-{member}")),
                &[],
            )
        })
        .collect();
    for w in &mut workers {
        wait_assigned(w, Duration::from_secs(60));
    }

    let tmux = Tmux {
        socket: format!("sluice-top-{}", std::process::id()),
    };
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "180",
        "-y",
        "50",
        "bash",
        "--norc",
        "--noprofile",
    ]);
    let command = format!(
        "{} top {} {}",
        env!("CARGO_BIN_EXE_sluice"),
        addrs[0],
        addrs[1]
    );
    tmux.run(&["send-keys", "-t", "top", &command, "Enter"]);
    let screen = tmux.wait_for("q quit");
    assert!(tmux.alternate_screen(), "top draws on the alternate screen");
    // Both members, the stage, and every partition's lag (the group splits the four).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut screen = screen;
    while !(0..4).all(|p| screen.contains(&format!("{input}/{p}"))) {
        let lags: Vec<String> = addrs
            .iter()
            .flat_map(|a| crate::scrape(a).unwrap_or_default())
            .filter(|s| s.0.starts_with("sluice_partition"))
            .map(|s| format!("{s:?}"))
            .collect();
        assert!(
            Instant::now() < deadline,
            "not every partition on the screen:\n{screen}\nlags served: {lags:#?}\n{}",
            workers.iter().map(Sluice::log_text).collect::<String>()
        );
        std::thread::sleep(Duration::from_millis(300));
        screen = tmux.screen();
    }
    for addr in &addrs {
        assert!(
            screen.contains(&format!("process {addr}: ")),
            "{addr}:\n{screen}"
        );
    }
    assert!(screen.contains("shout"), "{screen}");
    assert!(screen.contains("partitions: lag"), "{screen}");
    for p in 0..4 {
        assert!(screen.contains(&format!("{input}/{p}")), "{screen}");
    }
    // `s` sorts the stages.
    tmux.run(&["send-keys", "-t", "top", "s"]);
    tmux.wait_for("busiest first");
    // `q` quits and gives the terminal back: the shell's screen, no alternate screen.
    tmux.run(&["send-keys", "-t", "top", "q"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while tmux.alternate_screen() || tmux.screen().contains("q quit") {
        assert!(
            Instant::now() < deadline,
            "top did not quit:\n{}",
            tmux.screen()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(tmux.screen().contains(&command), "{}", tmux.screen());

    for w in workers {
        let (status, log) = w.interrupt();
        assert!(status.success(), "{log}");
    }
}

/// `sluice top` over a `--processes` supervisor finds its members: each serves its metrics
/// on the port above the supervisor's by its slot.
#[test]
fn top_over_a_supervisor_shows_its_worker_processes() {
    let broker = Broker::start();
    let input = broker.name("views");
    broker.create_topic(&input, 4);
    broker.produce(&input, &events(4_000, 4));
    let dir = tempfile::tempdir().unwrap();
    let path = write_pipeline(
        dir.path(),
        &format!(
            "name: supervised\n{}stages:\n  - name: shout\n    type: sql\n    query: SELECT id FROM input\nsink: {{ type: null }}\ncheckpoint: {{ dir: {}, interval: 1s }}\n",
            source_yaml(&broker, &input, &broker.name("g")),
            dir.path().join("ckpt").display()
        ),
    );
    // Three free ports in a row: the supervisor's and its two members'.
    let base = (0..50)
        .map(|_| free_port())
        .find(|p| {
            *p < 65_000
                && (1..=2).all(|k| std::net::TcpListener::bind(("127.0.0.1", p + k)).is_ok())
        })
        .expect("three free ports in a row");
    let addr = format!("127.0.0.1:{base}");
    let supervisor = Sluice::spawn(
        &[
            "run",
            path.to_str().unwrap(),
            "--processes",
            "2",
            "--metrics-addr",
            &addr,
        ],
        dir.path().join("log"),
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    let members = [
        format!("process 127.0.0.1:{}: ", base + 1),
        format!("process 127.0.0.1:{}: ", base + 2),
    ];
    loop {
        let out = crate::sluice(&["top", "--once", &addr]);
        let screen = crate::text(&out.stdout);
        if members.iter().all(|m| screen.contains(m.as_str())) && screen.contains("shout") {
            assert!(
                screen.contains("supervisor of 2 worker processes"),
                "{screen}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "members not shown:\n{screen}{}\n{}",
            crate::text(&out.stderr),
            supervisor.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let (status, log) = supervisor.interrupt();
    assert!(status.success(), "{log}");
}
