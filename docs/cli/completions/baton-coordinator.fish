# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_baton_coordinator_global_optspecs
    string join \n h/help V/version
end

function __fish_baton_coordinator_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_baton_coordinator_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_baton_coordinator_using_subcommand
    set -l cmd (__fish_baton_coordinator_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c baton-coordinator -n "__fish_baton_coordinator_needs_command" -s h -l help -d 'Print help'
complete -c baton-coordinator -n "__fish_baton_coordinator_needs_command" -s V -l version -d 'Print version'
complete -c baton-coordinator -n "__fish_baton_coordinator_needs_command" -f -a "serve" -d 'Serve the baton.v1 API'
complete -c baton-coordinator -n "__fish_baton_coordinator_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l listen -d 'gRPC listen address' -r
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l metrics-listen -d 'Metrics and health listen address (/metrics, /healthz, /readyz)' -r
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l data-dir -d 'Directory of the embedded store' -r -F
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l store -d 'Where the state lives' -r -f -a "embedded\t'One file under --data-dir (a single coordinator)'
etcd\t'etcd (--etcd-endpoints): any number of replicas, one leader elected with etcd\'s election API'
kubernetes\t'A ConfigMap written with resourceVersion compare-and-swap; leader elected on a Lease (2+ replicas in a cluster)'"
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l prepare-timeout -d 'The longest a grant\'s preparation (the etcd snapshot and leadership move) may take; past it the node keeps waiting and is tried again' -r
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l id -d 'This replica\'s id (default: the host name)' -r
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l max-concurrent -d 'How many nodes may hold the baton at once (control-plane nodes: one at a time whatever this says). Default 1; the policy file\'s `maxConcurrent` instead, if it sets it (setting both is an error)' -r
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l window -d 'Maintenance window, e.g. "Mon-Fri 22:00-04:00 Europe/Berlin" (repeatable; none = always)' -r
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l min-window-remaining -d 'Do not grant when less than this is left of the window (default 30m; or the policy file\'s `minWindowRemaining`)' -r
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l policy -d 'The rollout policy file (YAML; see the README). Flags are its defaults; it is reloaded on SIGHUP and when it changes, and a file that fails a check is refused (the running policy stays)' -r -F
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l renew-interval -d 'How often holders are asked to renew' -r
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l overdue-after -d 'A holder that has not renewed for this long is overdue (it keeps the baton; reboots must fit inside it to not raise an alert)' -r
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l tls-cert -d 'Server certificate (PEM). With --tls-key, serve TLS' -r -F
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l tls-key -d 'Server private key (PEM)' -r -F
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l client-ca -d 'CA bundle (PEM) that client certificates must chain to: mutual TLS. A client certificate\'s common name or DNS name must equal the node it acts for' -r -F
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l admin-name -d 'Client-certificate names that may act for any node and pause, resume and force-release (repeatable)' -r
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l etcd-endpoints -d 'The cluster\'s etcd client endpoints (comma-separated). Enables the quorum guard; also where `--store etcd` keeps the state' -r
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l etcd-cacert -d 'CA bundle (PEM) that etcd\'s server certificates chain to' -r -F
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l etcd-cert -d 'Client certificate (PEM) for etcd' -r -F
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l etcd-key -d 'Client key (PEM) for etcd' -r -F
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l etcd-member-map -d 'node=member pairs (comma-separated) for nodes whose etcd member is not named like the node' -r
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l etcd-exempt-node -d 'Nodes the guard does not check (repeatable or comma-separated). A node is never exempt because no member was found for it' -r
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l etcd-max-apply-lag -d 'The largest apply lag (leader\'s raft index minus the member\'s applied index) of a healthy member, in entries' -r
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l etcd-snapshot-dir -d 'Where verified snapshots are kept (default: <data-dir>/etcd-snapshots)' -r -F
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l etcd-snapshot-keep -d 'How many snapshots are kept' -r
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l backup-max-bytes -d 'The largest control-plane backup (a tar.gz of /etc/kubernetes/pki and the kubeadm configuration) an agent may send, in bytes; a bigger one is refused and nothing is kept. Backups are kept beside the etcd snapshot taken for the grant and rotated with it' -r
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l etcd-prefix -d 'Key prefix of the etcd store' -r
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l etcd-election-ttl -d 'TTL of the leader\'s election lease (a dead leader is replaced after about this long)' -r
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l etcd-probe-interval -d 'How often etcd\'s health is probed' -r
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l etcd-timeout -d 'Timeout of every etcd call made by a probe' -r
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l etcd-max-health-age -d 'Health data older than this answers no' -r
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l etcd-back-after -d 'Healthy probe rounds in a row before a node that went out counts as back' -r
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l kube-namespace -d 'Namespace of the Lease, the state object and the agents\' pods' -r
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l lease-name -d 'Name of the coordination.k8s.io/v1 Lease the replicas elect a leader on' -r
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l state-configmap -d 'Name of the ConfigMap holding the lease state (`--store kubernetes`)' -r
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l lease-duration -d 'How long a leader\'s Lease stays valid without renewal' -r
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l lease-renew-deadline -d 'A leader that could not renew for this long steps down (shorter than --lease-duration, so it stops before another replica may take over)' -r
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l lease-retry-period -d 'How often the Lease is renewed or checked' -r
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l node-facts-max-age -d 'Node facts not confirmed by a successful list or watch event for this long are unknown, and unknown facts hold every grant back' -r
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l agent-service-account -d 'The agents\' ServiceAccount (in --kube-namespace)' -r
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l token-audience -d 'The audience agent tokens must be issued for' -r
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l node-name -d 'The node this replica runs on (downward API `spec.nodeName`). While that node holds the baton this replica hands leadership to another, so the node can be drained (only the leader is Ready, and the coordinators\' disruption budget protects Ready pods)' -r
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l kube-admin -d 'Kubernetes user names (e.g. `system:serviceaccount:baton-system:batonctl`) that may act for any node and pause, resume and force-release (repeatable)' -r
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l kube-api-url -d 'Talk to this API server URL without credentials (e.g. `kubectl proxy`); default: in-cluster configuration or KUBECONFIG' -r
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l log-format -d 'Log format' -r -f -a "text\t'Human-readable lines'
json\t'One JSON object per line'"
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l initialize -d 'Create the lease state in an empty store: for a new installation only, once. Without it a store that holds no state is refused (the state may have been lost); with it a store that holds state is refused. Remove it after the first start'
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l insecure -d 'Accept clients without authentication (plaintext unless --tls-cert is given). For local labs only'
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l etcd-allow-degraded -d 'On clusters of 5 or more voting members, allow taking a member down while others are unhealthy as long as quorum remains'
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l etcd-allow-outage -d 'Allow taking down the only member of a 1-member cluster (after a verified snapshot): etcd is down while it reboots'
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l watch-nodes -d 'Watch Nodes even without `--store kubernetes` (implied by it)'
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l ignore-notready-nodes -d 'Do not count NotReady nodes against the concurrency limit (a NotReady control-plane node still holds back other control-plane nodes)'
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -l token-review -d 'Authenticate agents with ServiceAccount tokens checked by TokenReview'
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand serve" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand help; and not __fish_seen_subcommand_from serve help" -f -a "serve" -d 'Serve the baton.v1 API'
complete -c baton-coordinator -n "__fish_baton_coordinator_using_subcommand help; and not __fish_seen_subcommand_from serve help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
