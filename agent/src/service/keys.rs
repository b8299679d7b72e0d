//! `service.toml`'s keys, for the generated reference.

/// The value of a hook key, as the reference shows it.
const HOOK_VALUE: &str = "`[\"prog\", \"arg\"]` or `{ command = [...], timeout = \"30s\" }`";

/// Every key of `service.toml`, in reading order: the top level, then
/// `health.*`, then `hooks.*`. The reference (docs/reference/service-toml.md)
/// is generated from this list, and a test checks it against the keys the
/// reader accepts.
pub const KEYS: &[baton_common::reference::Key] = {
    use baton_common::reference::Key;
    &[
        Key {
            key: "command",
            value: "string (a path)",
            default: "required (except with `supervisor = \"systemd\"`)",
            about: "The program: a path relative to the release directory (without `..`) or an absolute path; not empty. It is taken as written (no `${NAME}` substitution). A systemd unit names its own program, so it may be left out there.",
        },
        Key {
            key: "args",
            value: "array of strings",
            default: "`[]`",
            about: "The program's arguments. Each `${NAME}` is replaced by the agent's variable (`--var NAME=VALUE` or `[vars]` in agent.toml; `${BATON_HOST_ID}` is always defined); an undefined one fails the activation.",
        },
        Key {
            key: "env",
            value: "table of strings",
            default: "`{}`",
            about: "Environment variables added to those the agent passes on (`BATON_SERVICE` and `BATON_VERSION` among them), for the process and its hooks; `${NAME}` is substituted in the values. A name must not be empty or contain `=`.",
        },
        Key {
            key: "listen",
            value: "array of strings (`\"tcp://IP:PORT\"`, `\"unix:///path\"`)",
            default: "`[]`",
            about: "Sockets the agent binds and hands to the process with the systemd socket-activation protocol (fds 3, 4, … in this order), `${NAME}` substituted. When the old process holds exactly these sockets, an upgrade starts the new process beside it and no connection is refused; otherwise it is stop, then start.",
        },
        Key {
            key: "stop_signal",
            value: "string (a signal name)",
            default: "`\"SIGTERM\"`",
            about: "The signal that asks the process to stop, with or without `SIG`, in any case (`SIGTERM`, `TERM`, `sigint`).",
        },
        Key {
            key: "stop_timeout",
            value: "duration (`\"30s\"`, `\"10m\"`)",
            default: "`\"10s\"`",
            about: "How long the process may take to stop (drain its requests) after `stop_signal` before it is killed with SIGKILL. At most 1h.",
        },
        Key {
            key: "health",
            value: "table",
            default: "",
            about: "How to check the service's health: the `health.*` keys. Without it, a host is healthy once its process has stayed alive for the plan's `min_healthy_time`.",
        },
        Key {
            key: "hooks",
            value: "table",
            default: "",
            about: "Commands run around the service's lifecycle: the `hooks.*` keys.",
        },
        Key {
            key: "supervisor",
            value: "`\"native\"` or `\"systemd\"`",
            default: "`\"native\"`",
            about: "Who runs the process: `native`, the agent itself; `systemd`, the systemd `unit`, which the agent restarts with `systemctl` after swapping the release. With `systemd`, `command` may be left out and `user` is refused.",
        },
        Key {
            key: "unit",
            value: "string",
            default: "required with `supervisor = \"systemd\"`",
            about: "The systemd unit to restart, e.g. `web.service` (no `/`, no whitespace), `${NAME}` substituted. Only with `supervisor = \"systemd\"`.",
        },
        Key {
            key: "ready",
            value: "`\"health\"` or `\"notify\"`",
            default: "`\"health\"`",
            about: "When a new process started beside the old one (a `listen` handoff) may take over: `health`, once a health check passes (it may reach either process); `notify`, once it sends `READY=1` to its own `NOTIFY_SOCKET`. Without a handoff it has no effect.",
        },
        Key {
            key: "user",
            value: "string",
            default: "the agent's user",
            about: "Run the process, its hooks and its `exec` health checks as this user (supplementary groups dropped), looked up on the host when the release is activated; `${NAME}` substituted. Refused with `supervisor = \"systemd\"` (set `User=` in the unit).",
        },
        Key {
            key: "group",
            value: "string",
            default: "the user's primary group",
            about: "The group to run as; only together with `user`. `${NAME}` substituted.",
        },
        Key {
            key: "health.kind",
            value: "`\"http\"`, `\"tcp\"`, `\"grpc\"` or `\"exec\"`",
            default: "required",
            about: "What one check does: `http`, a GET of `url` answers 2xx; `tcp`, a connection to `address` succeeds; `grpc`, `grpc.health.v1.Health/Check` at `address` (plaintext HTTP/2) answers SERVING; `exec`, `command` exits 0. A key of another kind is refused.",
        },
        Key {
            key: "health.url",
            value: "string (an `http://` or `https://` URL)",
            default: "required with `kind = \"http\"`",
            about: "The URL to GET, e.g. `http://127.0.0.1:${port}/healthz`; a 2xx answer passes, any other fails quoting the status and the start of the body. `https://` is checked against the system's CA certificates; redirects are not followed. `${NAME}` substituted. Only with `kind = \"http\"`.",
        },
        Key {
            key: "health.address",
            value: "string (`host:port`)",
            default: "required with `kind = \"tcp\"` or `\"grpc\"`",
            about: "Where to connect: a host name, an IPv4 address or a bracketed IPv6 address, and a numeric port; `${NAME}` substituted. Only with `kind = \"tcp\"` or `\"grpc\"`.",
        },
        Key {
            key: "health.command",
            value: "array of strings",
            default: "required with `kind = \"exec\"`",
            about: "The program (relative to the release directory without `..`, or absolute) and its arguments, run in the release directory (as `user`, if set); not empty, `${NAME}` substituted. Only with `kind = \"exec\"`.",
        },
        Key {
            key: "health.service",
            value: "string",
            default: "`\"\"` (the whole server)",
            about: "The gRPC service whose health is asked for; empty asks about the whole server. Taken as written (no substitution). Only with `kind = \"grpc\"`.",
        },
        Key {
            key: "health.interval",
            value: "duration",
            default: "`\"1s\"`",
            about: "The time between checks once they pass (until the first pass they retry faster, from 10 ms doubling up to it). Longer than zero, at most 5m.",
        },
        Key {
            key: "health.timeout",
            value: "duration",
            default: "`\"1s\"`",
            about: "How long one check may take before it counts as failed. Longer than zero, at most 5m.",
        },
        Key {
            key: "hooks.timeout",
            value: "duration",
            default: "`\"60s\"`",
            about: "How long each hook may run unless it sets its own `timeout`; a hook still running then is killed with its process group. At most 1h.",
        },
        Key {
            key: "hooks.pre_start",
            value: HOOK_VALUE,
            default: "",
            about: "The new release's hook, run before it is swapped in and started (e.g. a migration). A hook runs in its release's directory with the service's `env` and `user`, plus `BATON_SERVICE`, `BATON_VERSION` and `BATON_HOOK`; `${NAME}` substituted; failing, it fails the activation.",
        },
        Key {
            key: "hooks.post_start",
            value: HOOK_VALUE,
            default: "",
            about: "The new release's hook, run once its process has passed the health gate (e.g. warming a cache); failing, it fails the activation.",
        },
        Key {
            key: "hooks.pre_stop",
            value: HOOK_VALUE,
            default: "",
            about: "The running release's hook, run before its process is stopped: the place to take the host out of a load balancer when the service has no `listen`. Failing, it fails the activation.",
        },
        Key {
            key: "hooks.post_stop",
            value: HOOK_VALUE,
            default: "",
            about: "The stopped release's hook, run after its process has stopped (the process is stopped whatever the hook does); failing, it fails the activation.",
        },
    ]
};
