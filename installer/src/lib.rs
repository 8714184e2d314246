//! The agent installer the hub serves: the install script (`install.sh`, POSIX sh) and the
//! agent's systemd unit it installs. It renders text only and must not touch the network
//! or the host itself; the script does that on the customer's machine.
//!
//! The script's checks, exit codes and steps are documented in its header; `gantry-agent
//! preflight` (QUIC probe) and `gantry-agent deregister` (signed revocation request) are
//! the agent's side of it, and `hub/src/api/install.rs` the hub's.

/// The systemd unit for the agent, as installed to `/etc/systemd/system/gantry-agent.service`.
pub const AGENT_SYSTEMD_UNIT: &str = include_str!("../../deploy/systemd/gantry-agent.service");

/// The install script as kept in the repository, with its placeholders.
pub const SCRIPT_TEMPLATE: &str = include_str!("../install.sh");

/// Where the hub's public URL goes in the template.
const HUB_URL_PLACEHOLDER: &str = "@GANTRY_HUB_URL@";
/// Where the systemd unit goes in the template (a quoted here-document).
const UNIT_PLACEHOLDER: &str = "@GANTRY_AGENT_UNIT@";

/// The script the hub serves: the template with `hub_url` (e.g. `https://hub.example.com`)
/// and the systemd unit filled in. The URL sits in a single-quoted shell string, so a quote
/// in it is escaped and nothing in it can run.
pub fn render_script(hub_url: &str) -> String {
    let url = hub_url.trim_end_matches('/').replace('\'', r"'\''");
    SCRIPT_TEMPLATE.replacen(HUB_URL_PLACEHOLDER, &url, 1).replacen(UNIT_PLACEHOLDER, AGENT_SYSTEMD_UNIT.trim_end(), 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_runs_the_agent_hardened() {
        assert!(AGENT_SYSTEMD_UNIT.contains("ExecStart=/usr/local/bin/gantry-agent run --config /etc/gantry/agent.toml"));
        for line in ["NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=/var/lib/gantry-agent", "Restart=always"] {
            assert!(AGENT_SYSTEMD_UNIT.lines().any(|l| l == line), "{line} missing");
        }
    }

    #[test]
    fn the_script_gets_the_url_and_the_unit() {
        let script = render_script("https://hub.example.com/");
        assert!(script.contains("HUB_URL='https://hub.example.com'\n"), "{script}");
        assert!(script.contains("NoNewPrivileges=yes\nProtectSystem=strict"));
        assert!(!script.contains("@GANTRY_"));
        assert!(!AGENT_SYSTEMD_UNIT.lines().any(|l| l == "UNIT"), "the unit must not end the script's here-document early");
    }

    #[test]
    fn a_quote_in_the_url_cannot_break_out_of_the_string() {
        let script = render_script("http://x'; rm -rf /; '");
        assert!(script.contains(r"HUB_URL='http://x'\''; rm -rf /; '\'''"), "{script}");
    }

    #[test]
    fn header_and_help_list_the_same_options() {
        for option in
            ["--token TOKEN", "--label KEY=VALUE", "--state-dir DIR", "--dry-run", "--no-systemd", "--timeout SECONDS", "--uninstall", "--purge", "--help"]
        {
            assert!(SCRIPT_TEMPLATE.contains(&format!("#   {option} ")), "header lacks {option}");
            assert!(SCRIPT_TEMPLATE.contains(&format!("\n  {option} ")), "--help lacks {option}");
        }
    }

    #[test]
    fn header_and_help_list_the_same_exit_codes() {
        for code in [
            "0  done",
            "1  unexpected",
            "2  usage error",
            "3  preflight failed",
            "4  the hub refused",
            "5  the hub or its downloads",
            "6  installed and started",
        ] {
            assert!(SCRIPT_TEMPLATE.contains(&format!("#   {code}")), "header lacks {code}");
            assert!(SCRIPT_TEMPLATE.contains(&format!("\n  {code}")), "--help lacks {code}");
        }
    }
}
