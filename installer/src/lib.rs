//! The agent installer the hub serves: placeholder crate for the install script, preflight
//! checks and systemd unit. It renders text only and must not touch the network itself.

/// The systemd unit for the agent, as installed to `/etc/systemd/system/gantry-agent.service`.
pub const AGENT_SYSTEMD_UNIT: &str = include_str!("../../deploy/systemd/gantry-agent.service");

#[cfg(test)]
mod tests {
    #[test]
    fn unit_runs_the_agent() {
        assert!(super::AGENT_SYSTEMD_UNIT.contains("ExecStart=/usr/local/bin/gantry-agent run"));
    }
}
