//! The command line itself: which options each command offers.

use crate::util::pifleet_bin;

/// Whether `text` lists `option` (not merely a longer option such as
/// `--tokens-per-sec` for `--token`).
fn lists(text: &str, option: &str) -> bool {
    text.match_indices(option).any(|(at, _)| {
        let next = text[at + option.len()..].chars().next();
        !next.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-')
    })
}

fn help(args: &[&str]) -> String {
    let out = std::process::Command::new(pifleet_bin())
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?} --help: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn client_options_show_only_on_client_commands() {
    const CLIENT: [&str; 3] = ["--coordinator", "--token", "--json"];
    for command in [
        &["up"][..],
        &["ollama-sim"],
        &["node"],
        &["coordinator"],
        &["config", "check"],
    ] {
        let text = help(command);
        for option in CLIENT {
            assert!(
                !lists(&text, option),
                "{command:?} offers {option}:\n{text}"
            );
        }
    }
    for command in [&["status"][..], &["chat"], &["jobs", "list"], &["forget"]] {
        let text = help(command);
        for option in CLIENT {
            assert!(lists(&text, option), "{command:?} lacks {option}:\n{text}");
        }
    }
}
