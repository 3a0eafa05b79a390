# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_baton_agent_global_optspecs
    string join \n h/help V/version
end

function __fish_baton_agent_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_baton_agent_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_baton_agent_using_subcommand
    set -l cmd (__fish_baton_agent_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c baton-agent -n "__fish_baton_agent_needs_command" -s h -l help -d 'Print help'
complete -c baton-agent -n "__fish_baton_agent_needs_command" -s V -l version -d 'Print version'
complete -c baton-agent -n "__fish_baton_agent_needs_command" -f -a "run" -d 'Watch for maintenance needs and carry out maintenance with the baton'
complete -c baton-agent -n "__fish_baton_agent_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l node -d 'This node\'s name (the Kubernetes node name, or the host name)' -r
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l state-dir -d 'Where the agent keeps its state across restarts and reboots' -r -F
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l mode -d 'How the node is taken out of service' -r -f -a "standalone\t'No Kubernetes: pre- and post-maintenance systemd units'
kubernetes\t'A Kubernetes node: cordon and drain before, Ready and uncordon after, annotations and Events on the Node, blocking pods respected'"
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l label -d 'A label for the coordinator\'s policy (pool selectors, zones) on hosts without Kubernetes, as KEY=VALUE (repeatable, or comma-separated in the environment), e.g. `--label topology.kubernetes.io/zone=rack-a`' -r
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l dbus-address -d 'D-Bus address of the system bus (default: the standard system bus)' -r
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l log-format -d 'Log format' -r -f -a "text\t'Human-readable lines'
json\t'One JSON object per line'"
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l coordinator -d 'The coordinator\'s URL (http://... with --insecure, https://... with TLS)' -r
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l ca -d 'CA certificate (PEM) that signed the coordinator\'s certificate' -r -F
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l cert -d 'This agent\'s client certificate (PEM), for mutual TLS' -r -F
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l key -d 'This agent\'s private key (PEM), for mutual TLS' -r -F
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l token-file -d 'A file holding a bearer token sent on every call (a projected ServiceAccount token with audience `baton`); re-read when it changes. With --ca (server TLS) or --insecure; not with a client certificate' -r -F
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l reboot-sentinel -d 'A file whose existence means "reboot required" (repeatable; the environment variable takes a comma-separated list)' -r -F
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l reboot-sentinel-command -d 'A shell command that exits 0 when a reboot is required and 1 when not; any other exit status (126, 127, 124, 137, ...), a signal or `--check-timeout` is no answer, never "no"' -r
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l update-check-command -d 'A shell command that exits 0 when updates are available (the same rules as `--reboot-sentinel-command`)' -r
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l check-interval -d 'How often sentinels and check commands are re-checked (inotify wakes the agent at once for sentinel files)' -r
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l update-unit -d 'The unit that applies updates (e.g. apt-daily-upgrade.service)' -r
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l update-command -d 'A shell command that applies updates, run as a transient unit' -r
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l pre-maintenance-unit -d 'A unit started before maintenance (standalone mode)' -r
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l post-maintenance-unit -d 'A unit started after maintenance (standalone mode)' -r
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l post-check-unit -d 'A unit that checks the node after boot' -r
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l post-check-command -d 'A shell command that checks the node after boot (transient unit)' -r
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l backup-path -d 'What the control-plane backup holds (repeatable, or comma-separated in the environment): files or directories, archived with their modes. The coordinator asks for the backup when it grants a control-plane node that carries an etcd member, and keeps it beside the etcd snapshot taken for that grant. In Kubernetes mode the kube-system/kubeadm-config ConfigMap is added. Add the kubeadm configuration file if this node keeps one (e.g. `--backup-path /etc/kubernetes/pki --backup-path /etc/kubernetes/kubeadm.yaml`). A path that does not exist fails the backup, and the node is not drained' -r -F
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l update-timeout -d 'How long the update may run' -r
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l post-check-timeout -d 'How long the post-check may run' -r
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l node-ops-timeout -d 'How long pre- and post-maintenance units may run' -r
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l reboot-timeout -d 'How long to wait for the machine to go down after asking to reboot' -r
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l renew-interval -d 'How often to renew the baton (a shorter interval from the coordinator wins)' -r
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l retry-interval -d 'How long to wait before retrying a failed coordinator call' -r
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l abort-backoff -d 'How long to hold back before asking again after a maintenance that was aborted (a drain that timed out) or lost (force-released), or after which the need was still there; doubles with each one in a row, up to an hour. Persisted across restarts' -r
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l call-timeout -d 'The deadline of every call to the coordinator (the wait for a grant aside)' -r
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l inhibitor-timeout -d 'How long to wait for logind\'s block inhibitors on shutdown to go before the reboot; then the maintenance fails (the baton stays held)' -r
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l dbus-timeout -d 'The deadline of every D-Bus call to systemd and logind' -r
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l check-timeout -d 'How long a sentinel or update-check command, or looking at the sentinel files, may take before the check is an error' -r
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l drain-timeout -d 'Give up draining after this long; the maintenance is aborted (the node uncordoned unless it was cordoned before) unless --force-reboot-on-drain-timeout is set' -r
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l drain-parallelism -d 'How many evictions run at once' -r
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l drain-pod-selector -d 'Only evict pods matching this label selector (others are left running)' -r
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l blocking-pod-selector -d 'While a pod matching this label selector runs on the node, do not ask for the baton (repeatable)' -r
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l node-ready-timeout -d 'How long to wait for the node to be Ready after a reboot' -r
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l event-namespace -d 'Namespace the node Events are written to' -r
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l kube-api-url -d 'Talk to this API server URL without credentials (e.g. `kubectl proxy`); default: in-cluster configuration or KUBECONFIG' -r
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l control-plane -d 'This node is a control-plane node'
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l insecure -d 'Talk plain text (local labs only): without authentication, or with --token-file'
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l ignore-inhibitors -d 'Reboot even while logind inhibitor locks (mode "block", what "shutdown") are held. By default the agent waits for them to go, up to --inhibitor-timeout, and then fails'
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l reboot-fallback-target -d 'When logind refuses the reboot, start reboot.target instead. That bypasses logind (and every inhibitor), so it is off by default'
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l force-reboot-on-drain-timeout -d 'Reboot even when the drain timed out (explicit opt-out of aborting)'
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l delete-emptydir-data -d 'Evict pods with emptyDir volumes (their data is lost)'
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -l evict-unmanaged-pods -d 'Evict pods no controller manages (they are not recreated)'
complete -c baton-agent -n "__fish_baton_agent_using_subcommand run" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c baton-agent -n "__fish_baton_agent_using_subcommand help; and not __fish_seen_subcommand_from run help" -f -a "run" -d 'Watch for maintenance needs and carry out maintenance with the baton'
complete -c baton-agent -n "__fish_baton_agent_using_subcommand help; and not __fish_seen_subcommand_from run help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
