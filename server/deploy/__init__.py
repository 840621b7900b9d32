"""Flower's deployment engine on loopback or on several hosts: keys, a SuperLink with TLS
and SuperNode authentication, SuperNodes with their own data and ledger keys, runs
followed to their recorded status, and a teardown by process group.

Everything here is what docs/deployment.md tells a user to do by hand with
``flower-superlink``, ``flower-supernode`` and ``flwr``; this package saves the typing and
keeps what it started in ``WORK/deploy.json`` so that ``run`` and ``down`` find it.

- :mod:`server.deploy.errors`: :class:`DeployError` and its refusals.
- :mod:`server.deploy.keys`: the CA, the SuperLink certificate, node keys, :class:`KeyLayout`.
- :mod:`server.deploy.processes`: ports, the process list, groups, spawning, log tails.
- :mod:`server.deploy.state`: the records and :class:`DeployState` (``WORK/deploy.json``).
- :mod:`server.deploy.flower`: Flower's executables, environment, ``flwr`` calls, config
  strings.
- :mod:`server.deploy.lifecycle`: ``up``, ``add_nodes``, ``submit``, ``follow``, ``down``.

Each module imports only those listed before it.
"""

from __future__ import annotations

from server.deploy.errors import DeployError, MissingFile, PortInUse
from server.deploy.flower import (
    CONNECTION,
    EXEC_POLL_ENV,
    child_env,
    config_toml,
    flwr_json,
    last_json,
    node_config_string,
    run_flwr,
    toml_value,
    tool,
    write_connection,
)
from server.deploy.keys import (
    DEFAULT_SANS,
    NODE_AUTH_CURVE,
    TLS_CURVE,
    KeyLayout,
    KeysResult,
    certificate_sans,
    check_keys,
    create_keys,
    create_node_auth_key,
    node_name,
    write_private,
)
from server.deploy.lifecycle import (
    DEFAULT_EXEC_POLL_SECONDS,
    DEFAULT_NODE_POLL_SECONDS,
    ISOLATIONS,
    WARM_SUPEREXEC,
    NewNode,
    UpOptions,
    add_nodes,
    down,
    follow,
    next_out_dir,
    online_nodes,
    run_log,
    run_status,
    submit,
    up,
    write_node_data,
)
from server.deploy.processes import (
    ProcessInfo,
    descendant_groups,
    ensure_port_free,
    free_port,
    list_processes,
    live_members,
    log_tail,
    stop_groups,
)
from server.deploy.state import (
    STATE_FILE,
    STATE_VERSION,
    DeployState,
    NodeRecord,
    ProcessRecord,
    RunRecord,
    load_state,
    running_records,
)

__all__ = [
    "CONNECTION",
    "DEFAULT_SANS",
    "DEFAULT_EXEC_POLL_SECONDS",
    "DEFAULT_NODE_POLL_SECONDS",
    "EXEC_POLL_ENV",
    "ISOLATIONS",
    "NODE_AUTH_CURVE",
    "STATE_FILE",
    "STATE_VERSION",
    "TLS_CURVE",
    "WARM_SUPEREXEC",
    "DeployError",
    "DeployState",
    "KeyLayout",
    "KeysResult",
    "MissingFile",
    "NewNode",
    "NodeRecord",
    "PortInUse",
    "ProcessInfo",
    "ProcessRecord",
    "RunRecord",
    "UpOptions",
    "add_nodes",
    "certificate_sans",
    "check_keys",
    "child_env",
    "config_toml",
    "create_keys",
    "create_node_auth_key",
    "descendant_groups",
    "down",
    "ensure_port_free",
    "flwr_json",
    "follow",
    "free_port",
    "last_json",
    "list_processes",
    "live_members",
    "load_state",
    "log_tail",
    "next_out_dir",
    "node_config_string",
    "node_name",
    "online_nodes",
    "run_flwr",
    "run_log",
    "run_status",
    "running_records",
    "stop_groups",
    "submit",
    "tool",
    "toml_value",
    "up",
    "write_connection",
    "write_node_data",
    "write_private",
]
