# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_batonctl_global_optspecs
    string join \n coordinator= insecure ca= cert= key= kube kube-context= kube-namespace= kube-lease= kube-service-account= kube-token-audience= kube-ca-configmap= kube-server-name= h/help V/version
end

function __fish_batonctl_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_batonctl_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_batonctl_using_subcommand
    set -l cmd (__fish_batonctl_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c batonctl -n "__fish_batonctl_needs_command" -l coordinator -d 'Coordinator URL (http:// needs --insecure; https:// uses TLS)' -r
complete -c batonctl -n "__fish_batonctl_needs_command" -l ca -d 'CA bundle (PEM) the coordinator\'s certificate chains to' -r -F
complete -c batonctl -n "__fish_batonctl_needs_command" -l cert -d 'Client certificate (PEM) for mutual TLS' -r -F
complete -c batonctl -n "__fish_batonctl_needs_command" -l key -d 'Client key (PEM)' -r -F
complete -c batonctl -n "__fish_batonctl_needs_command" -l kube-context -d 'The kubeconfig context to use (default: the current one)' -r
complete -c batonctl -n "__fish_batonctl_needs_command" -l kube-namespace -d 'The namespace Baton is installed in' -r
complete -c batonctl -n "__fish_batonctl_needs_command" -l kube-lease -d 'The Lease the coordinators elect their leader on' -r
complete -c batonctl -n "__fish_batonctl_needs_command" -l kube-service-account -d 'The ServiceAccount whose token batonctl presents (the coordinator\'s --kube-admin names it)' -r
complete -c batonctl -n "__fish_batonctl_needs_command" -l kube-token-audience -d 'The audience of that token (the coordinator\'s --token-audience)' -r
complete -c batonctl -n "__fish_batonctl_needs_command" -l kube-ca-configmap -d 'The ConfigMap whose `ca.crt` the coordinator\'s certificate chains to (read when --ca is not given; public, unlike the TLS Secret)' -r
complete -c batonctl -n "__fish_batonctl_needs_command" -l kube-server-name -d 'The name the coordinator\'s certificate must carry (default: baton-coordinator.NAMESPACE.svc, the Service\'s name)' -r
complete -c batonctl -n "__fish_batonctl_needs_command" -l insecure -d 'Allow plaintext http:// (labs only)'
complete -c batonctl -n "__fish_batonctl_needs_command" -l kube -d 'Reach the leading coordinator through the Kubernetes API (port-forward with your kubeconfig) instead of --coordinator'
complete -c batonctl -n "__fish_batonctl_needs_command" -s h -l help -d 'Print help'
complete -c batonctl -n "__fish_batonctl_needs_command" -s V -l version -d 'Print version'
complete -c batonctl -n "__fish_batonctl_needs_command" -f -a "status" -d 'Show holders, the queue and the audit trail'
complete -c batonctl -n "__fish_batonctl_needs_command" -f -a "policy" -d 'Show the rollout policy in force, where it came from and when it was loaded (and the last refused reload, if any)'
complete -c batonctl -n "__fish_batonctl_needs_command" -f -a "plan" -d 'Dry run: the order the waiting nodes would be granted in and what each waits for. Grants nothing'
complete -c batonctl -n "__fish_batonctl_needs_command" -f -a "pause" -d 'Stop granting (holders finish)'
complete -c batonctl -n "__fish_batonctl_needs_command" -f -a "resume" -d 'Grant again'
complete -c batonctl -n "__fish_batonctl_needs_command" -f -a "acquire" -d 'Wait for the baton for NODE and print its fencing token'
complete -c batonctl -n "__fish_batonctl_needs_command" -f -a "release" -d 'Give NODE\'s baton back'
complete -c batonctl -n "__fish_batonctl_needs_command" -f -a "force-release" -d 'Take the baton from NODE (audited). Name the token you saw in `status` with --token, so a late command cannot drop a newer grant of the same node; --any-token takes whatever it holds'
complete -c batonctl -n "__fish_batonctl_needs_command" -f -a "hold" -d 'Take the baton for NODE, run CMD, release, exit with CMD\'s status'
complete -c batonctl -n "__fish_batonctl_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c batonctl -n "__fish_batonctl_using_subcommand status" -s o -l output -d 'Output format' -r -f -a "table\t'A human table'
json\t'JSON (one object per state with --watch)'"
complete -c batonctl -n "__fish_batonctl_using_subcommand status" -l coordinator -d 'Coordinator URL (http:// needs --insecure; https:// uses TLS)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand status" -l ca -d 'CA bundle (PEM) the coordinator\'s certificate chains to' -r -F
complete -c batonctl -n "__fish_batonctl_using_subcommand status" -l cert -d 'Client certificate (PEM) for mutual TLS' -r -F
complete -c batonctl -n "__fish_batonctl_using_subcommand status" -l key -d 'Client key (PEM)' -r -F
complete -c batonctl -n "__fish_batonctl_using_subcommand status" -l kube-context -d 'The kubeconfig context to use (default: the current one)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand status" -l kube-namespace -d 'The namespace Baton is installed in' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand status" -l kube-lease -d 'The Lease the coordinators elect their leader on' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand status" -l kube-service-account -d 'The ServiceAccount whose token batonctl presents (the coordinator\'s --kube-admin names it)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand status" -l kube-token-audience -d 'The audience of that token (the coordinator\'s --token-audience)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand status" -l kube-ca-configmap -d 'The ConfigMap whose `ca.crt` the coordinator\'s certificate chains to (read when --ca is not given; public, unlike the TLS Secret)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand status" -l kube-server-name -d 'The name the coordinator\'s certificate must carry (default: baton-coordinator.NAMESPACE.svc, the Service\'s name)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand status" -l watch -d 'Print again after every change'
complete -c batonctl -n "__fish_batonctl_using_subcommand status" -l insecure -d 'Allow plaintext http:// (labs only)'
complete -c batonctl -n "__fish_batonctl_using_subcommand status" -l kube -d 'Reach the leading coordinator through the Kubernetes API (port-forward with your kubeconfig) instead of --coordinator'
complete -c batonctl -n "__fish_batonctl_using_subcommand status" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c batonctl -n "__fish_batonctl_using_subcommand policy" -s o -l output -d 'Output format (table: the YAML with a header)' -r -f -a "table\t'A human table'
json\t'JSON (one object per state with --watch)'"
complete -c batonctl -n "__fish_batonctl_using_subcommand policy" -l coordinator -d 'Coordinator URL (http:// needs --insecure; https:// uses TLS)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand policy" -l ca -d 'CA bundle (PEM) the coordinator\'s certificate chains to' -r -F
complete -c batonctl -n "__fish_batonctl_using_subcommand policy" -l cert -d 'Client certificate (PEM) for mutual TLS' -r -F
complete -c batonctl -n "__fish_batonctl_using_subcommand policy" -l key -d 'Client key (PEM)' -r -F
complete -c batonctl -n "__fish_batonctl_using_subcommand policy" -l kube-context -d 'The kubeconfig context to use (default: the current one)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand policy" -l kube-namespace -d 'The namespace Baton is installed in' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand policy" -l kube-lease -d 'The Lease the coordinators elect their leader on' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand policy" -l kube-service-account -d 'The ServiceAccount whose token batonctl presents (the coordinator\'s --kube-admin names it)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand policy" -l kube-token-audience -d 'The audience of that token (the coordinator\'s --token-audience)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand policy" -l kube-ca-configmap -d 'The ConfigMap whose `ca.crt` the coordinator\'s certificate chains to (read when --ca is not given; public, unlike the TLS Secret)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand policy" -l kube-server-name -d 'The name the coordinator\'s certificate must carry (default: baton-coordinator.NAMESPACE.svc, the Service\'s name)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand policy" -l insecure -d 'Allow plaintext http:// (labs only)'
complete -c batonctl -n "__fish_batonctl_using_subcommand policy" -l kube -d 'Reach the leading coordinator through the Kubernetes API (port-forward with your kubeconfig) instead of --coordinator'
complete -c batonctl -n "__fish_batonctl_using_subcommand policy" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c batonctl -n "__fish_batonctl_using_subcommand plan" -s o -l output -d 'Output format' -r -f -a "table\t'A human table'
json\t'JSON (one object per state with --watch)'"
complete -c batonctl -n "__fish_batonctl_using_subcommand plan" -l coordinator -d 'Coordinator URL (http:// needs --insecure; https:// uses TLS)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand plan" -l ca -d 'CA bundle (PEM) the coordinator\'s certificate chains to' -r -F
complete -c batonctl -n "__fish_batonctl_using_subcommand plan" -l cert -d 'Client certificate (PEM) for mutual TLS' -r -F
complete -c batonctl -n "__fish_batonctl_using_subcommand plan" -l key -d 'Client key (PEM)' -r -F
complete -c batonctl -n "__fish_batonctl_using_subcommand plan" -l kube-context -d 'The kubeconfig context to use (default: the current one)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand plan" -l kube-namespace -d 'The namespace Baton is installed in' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand plan" -l kube-lease -d 'The Lease the coordinators elect their leader on' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand plan" -l kube-service-account -d 'The ServiceAccount whose token batonctl presents (the coordinator\'s --kube-admin names it)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand plan" -l kube-token-audience -d 'The audience of that token (the coordinator\'s --token-audience)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand plan" -l kube-ca-configmap -d 'The ConfigMap whose `ca.crt` the coordinator\'s certificate chains to (read when --ca is not given; public, unlike the TLS Secret)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand plan" -l kube-server-name -d 'The name the coordinator\'s certificate must carry (default: baton-coordinator.NAMESPACE.svc, the Service\'s name)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand plan" -l insecure -d 'Allow plaintext http:// (labs only)'
complete -c batonctl -n "__fish_batonctl_using_subcommand plan" -l kube -d 'Reach the leading coordinator through the Kubernetes API (port-forward with your kubeconfig) instead of --coordinator'
complete -c batonctl -n "__fish_batonctl_using_subcommand plan" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c batonctl -n "__fish_batonctl_using_subcommand pause" -l reason -d 'Why (audited)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand pause" -l coordinator -d 'Coordinator URL (http:// needs --insecure; https:// uses TLS)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand pause" -l ca -d 'CA bundle (PEM) the coordinator\'s certificate chains to' -r -F
complete -c batonctl -n "__fish_batonctl_using_subcommand pause" -l cert -d 'Client certificate (PEM) for mutual TLS' -r -F
complete -c batonctl -n "__fish_batonctl_using_subcommand pause" -l key -d 'Client key (PEM)' -r -F
complete -c batonctl -n "__fish_batonctl_using_subcommand pause" -l kube-context -d 'The kubeconfig context to use (default: the current one)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand pause" -l kube-namespace -d 'The namespace Baton is installed in' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand pause" -l kube-lease -d 'The Lease the coordinators elect their leader on' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand pause" -l kube-service-account -d 'The ServiceAccount whose token batonctl presents (the coordinator\'s --kube-admin names it)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand pause" -l kube-token-audience -d 'The audience of that token (the coordinator\'s --token-audience)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand pause" -l kube-ca-configmap -d 'The ConfigMap whose `ca.crt` the coordinator\'s certificate chains to (read when --ca is not given; public, unlike the TLS Secret)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand pause" -l kube-server-name -d 'The name the coordinator\'s certificate must carry (default: baton-coordinator.NAMESPACE.svc, the Service\'s name)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand pause" -l insecure -d 'Allow plaintext http:// (labs only)'
complete -c batonctl -n "__fish_batonctl_using_subcommand pause" -l kube -d 'Reach the leading coordinator through the Kubernetes API (port-forward with your kubeconfig) instead of --coordinator'
complete -c batonctl -n "__fish_batonctl_using_subcommand pause" -s h -l help -d 'Print help'
complete -c batonctl -n "__fish_batonctl_using_subcommand resume" -l coordinator -d 'Coordinator URL (http:// needs --insecure; https:// uses TLS)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand resume" -l ca -d 'CA bundle (PEM) the coordinator\'s certificate chains to' -r -F
complete -c batonctl -n "__fish_batonctl_using_subcommand resume" -l cert -d 'Client certificate (PEM) for mutual TLS' -r -F
complete -c batonctl -n "__fish_batonctl_using_subcommand resume" -l key -d 'Client key (PEM)' -r -F
complete -c batonctl -n "__fish_batonctl_using_subcommand resume" -l kube-context -d 'The kubeconfig context to use (default: the current one)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand resume" -l kube-namespace -d 'The namespace Baton is installed in' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand resume" -l kube-lease -d 'The Lease the coordinators elect their leader on' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand resume" -l kube-service-account -d 'The ServiceAccount whose token batonctl presents (the coordinator\'s --kube-admin names it)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand resume" -l kube-token-audience -d 'The audience of that token (the coordinator\'s --token-audience)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand resume" -l kube-ca-configmap -d 'The ConfigMap whose `ca.crt` the coordinator\'s certificate chains to (read when --ca is not given; public, unlike the TLS Secret)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand resume" -l kube-server-name -d 'The name the coordinator\'s certificate must carry (default: baton-coordinator.NAMESPACE.svc, the Service\'s name)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand resume" -l insecure -d 'Allow plaintext http:// (labs only)'
complete -c batonctl -n "__fish_batonctl_using_subcommand resume" -l kube -d 'Reach the leading coordinator through the Kubernetes API (port-forward with your kubeconfig) instead of --coordinator'
complete -c batonctl -n "__fish_batonctl_using_subcommand resume" -s h -l help -d 'Print help'
complete -c batonctl -n "__fish_batonctl_using_subcommand acquire" -l wait-timeout -d 'Give up (and withdraw) after this long, e.g. 10m' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand acquire" -l reason -d 'Why (shown in status)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand acquire" -l coordinator -d 'Coordinator URL (http:// needs --insecure; https:// uses TLS)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand acquire" -l ca -d 'CA bundle (PEM) the coordinator\'s certificate chains to' -r -F
complete -c batonctl -n "__fish_batonctl_using_subcommand acquire" -l cert -d 'Client certificate (PEM) for mutual TLS' -r -F
complete -c batonctl -n "__fish_batonctl_using_subcommand acquire" -l key -d 'Client key (PEM)' -r -F
complete -c batonctl -n "__fish_batonctl_using_subcommand acquire" -l kube-context -d 'The kubeconfig context to use (default: the current one)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand acquire" -l kube-namespace -d 'The namespace Baton is installed in' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand acquire" -l kube-lease -d 'The Lease the coordinators elect their leader on' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand acquire" -l kube-service-account -d 'The ServiceAccount whose token batonctl presents (the coordinator\'s --kube-admin names it)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand acquire" -l kube-token-audience -d 'The audience of that token (the coordinator\'s --token-audience)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand acquire" -l kube-ca-configmap -d 'The ConfigMap whose `ca.crt` the coordinator\'s certificate chains to (read when --ca is not given; public, unlike the TLS Secret)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand acquire" -l kube-server-name -d 'The name the coordinator\'s certificate must carry (default: baton-coordinator.NAMESPACE.svc, the Service\'s name)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand acquire" -l control-plane -d 'The node is a control-plane node'
complete -c batonctl -n "__fish_batonctl_using_subcommand acquire" -l insecure -d 'Allow plaintext http:// (labs only)'
complete -c batonctl -n "__fish_batonctl_using_subcommand acquire" -l kube -d 'Reach the leading coordinator through the Kubernetes API (port-forward with your kubeconfig) instead of --coordinator'
complete -c batonctl -n "__fish_batonctl_using_subcommand acquire" -s h -l help -d 'Print help'
complete -c batonctl -n "__fish_batonctl_using_subcommand release" -l token -d 'Its fencing token' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand release" -l reason -d 'Why (audited)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand release" -l coordinator -d 'Coordinator URL (http:// needs --insecure; https:// uses TLS)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand release" -l ca -d 'CA bundle (PEM) the coordinator\'s certificate chains to' -r -F
complete -c batonctl -n "__fish_batonctl_using_subcommand release" -l cert -d 'Client certificate (PEM) for mutual TLS' -r -F
complete -c batonctl -n "__fish_batonctl_using_subcommand release" -l key -d 'Client key (PEM)' -r -F
complete -c batonctl -n "__fish_batonctl_using_subcommand release" -l kube-context -d 'The kubeconfig context to use (default: the current one)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand release" -l kube-namespace -d 'The namespace Baton is installed in' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand release" -l kube-lease -d 'The Lease the coordinators elect their leader on' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand release" -l kube-service-account -d 'The ServiceAccount whose token batonctl presents (the coordinator\'s --kube-admin names it)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand release" -l kube-token-audience -d 'The audience of that token (the coordinator\'s --token-audience)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand release" -l kube-ca-configmap -d 'The ConfigMap whose `ca.crt` the coordinator\'s certificate chains to (read when --ca is not given; public, unlike the TLS Secret)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand release" -l kube-server-name -d 'The name the coordinator\'s certificate must carry (default: baton-coordinator.NAMESPACE.svc, the Service\'s name)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand release" -l insecure -d 'Allow plaintext http:// (labs only)'
complete -c batonctl -n "__fish_batonctl_using_subcommand release" -l kube -d 'Reach the leading coordinator through the Kubernetes API (port-forward with your kubeconfig) instead of --coordinator'
complete -c batonctl -n "__fish_batonctl_using_subcommand release" -s h -l help -d 'Print help'
complete -c batonctl -n "__fish_batonctl_using_subcommand force-release" -l token -d 'The fencing token NODE must still hold (from `batonctl status`)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand force-release" -l reason -d 'Why (required)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand force-release" -l coordinator -d 'Coordinator URL (http:// needs --insecure; https:// uses TLS)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand force-release" -l ca -d 'CA bundle (PEM) the coordinator\'s certificate chains to' -r -F
complete -c batonctl -n "__fish_batonctl_using_subcommand force-release" -l cert -d 'Client certificate (PEM) for mutual TLS' -r -F
complete -c batonctl -n "__fish_batonctl_using_subcommand force-release" -l key -d 'Client key (PEM)' -r -F
complete -c batonctl -n "__fish_batonctl_using_subcommand force-release" -l kube-context -d 'The kubeconfig context to use (default: the current one)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand force-release" -l kube-namespace -d 'The namespace Baton is installed in' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand force-release" -l kube-lease -d 'The Lease the coordinators elect their leader on' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand force-release" -l kube-service-account -d 'The ServiceAccount whose token batonctl presents (the coordinator\'s --kube-admin names it)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand force-release" -l kube-token-audience -d 'The audience of that token (the coordinator\'s --token-audience)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand force-release" -l kube-ca-configmap -d 'The ConfigMap whose `ca.crt` the coordinator\'s certificate chains to (read when --ca is not given; public, unlike the TLS Secret)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand force-release" -l kube-server-name -d 'The name the coordinator\'s certificate must carry (default: baton-coordinator.NAMESPACE.svc, the Service\'s name)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand force-release" -l any-token -d 'Take whatever token NODE holds'
complete -c batonctl -n "__fish_batonctl_using_subcommand force-release" -l insecure -d 'Allow plaintext http:// (labs only)'
complete -c batonctl -n "__fish_batonctl_using_subcommand force-release" -l kube -d 'Reach the leading coordinator through the Kubernetes API (port-forward with your kubeconfig) instead of --coordinator'
complete -c batonctl -n "__fish_batonctl_using_subcommand force-release" -s h -l help -d 'Print help'
complete -c batonctl -n "__fish_batonctl_using_subcommand hold" -l reason -d 'Why (shown in status)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand hold" -l wait-timeout -d 'Give up (and withdraw) after this long' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand hold" -l coordinator -d 'Coordinator URL (http:// needs --insecure; https:// uses TLS)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand hold" -l ca -d 'CA bundle (PEM) the coordinator\'s certificate chains to' -r -F
complete -c batonctl -n "__fish_batonctl_using_subcommand hold" -l cert -d 'Client certificate (PEM) for mutual TLS' -r -F
complete -c batonctl -n "__fish_batonctl_using_subcommand hold" -l key -d 'Client key (PEM)' -r -F
complete -c batonctl -n "__fish_batonctl_using_subcommand hold" -l kube-context -d 'The kubeconfig context to use (default: the current one)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand hold" -l kube-namespace -d 'The namespace Baton is installed in' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand hold" -l kube-lease -d 'The Lease the coordinators elect their leader on' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand hold" -l kube-service-account -d 'The ServiceAccount whose token batonctl presents (the coordinator\'s --kube-admin names it)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand hold" -l kube-token-audience -d 'The audience of that token (the coordinator\'s --token-audience)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand hold" -l kube-ca-configmap -d 'The ConfigMap whose `ca.crt` the coordinator\'s certificate chains to (read when --ca is not given; public, unlike the TLS Secret)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand hold" -l kube-server-name -d 'The name the coordinator\'s certificate must carry (default: baton-coordinator.NAMESPACE.svc, the Service\'s name)' -r
complete -c batonctl -n "__fish_batonctl_using_subcommand hold" -l control-plane -d 'The node is a control-plane node'
complete -c batonctl -n "__fish_batonctl_using_subcommand hold" -l insecure -d 'Allow plaintext http:// (labs only)'
complete -c batonctl -n "__fish_batonctl_using_subcommand hold" -l kube -d 'Reach the leading coordinator through the Kubernetes API (port-forward with your kubeconfig) instead of --coordinator'
complete -c batonctl -n "__fish_batonctl_using_subcommand hold" -s h -l help -d 'Print help'
complete -c batonctl -n "__fish_batonctl_using_subcommand help; and not __fish_seen_subcommand_from status policy plan pause resume acquire release force-release hold help" -f -a "status" -d 'Show holders, the queue and the audit trail'
complete -c batonctl -n "__fish_batonctl_using_subcommand help; and not __fish_seen_subcommand_from status policy plan pause resume acquire release force-release hold help" -f -a "policy" -d 'Show the rollout policy in force, where it came from and when it was loaded (and the last refused reload, if any)'
complete -c batonctl -n "__fish_batonctl_using_subcommand help; and not __fish_seen_subcommand_from status policy plan pause resume acquire release force-release hold help" -f -a "plan" -d 'Dry run: the order the waiting nodes would be granted in and what each waits for. Grants nothing'
complete -c batonctl -n "__fish_batonctl_using_subcommand help; and not __fish_seen_subcommand_from status policy plan pause resume acquire release force-release hold help" -f -a "pause" -d 'Stop granting (holders finish)'
complete -c batonctl -n "__fish_batonctl_using_subcommand help; and not __fish_seen_subcommand_from status policy plan pause resume acquire release force-release hold help" -f -a "resume" -d 'Grant again'
complete -c batonctl -n "__fish_batonctl_using_subcommand help; and not __fish_seen_subcommand_from status policy plan pause resume acquire release force-release hold help" -f -a "acquire" -d 'Wait for the baton for NODE and print its fencing token'
complete -c batonctl -n "__fish_batonctl_using_subcommand help; and not __fish_seen_subcommand_from status policy plan pause resume acquire release force-release hold help" -f -a "release" -d 'Give NODE\'s baton back'
complete -c batonctl -n "__fish_batonctl_using_subcommand help; and not __fish_seen_subcommand_from status policy plan pause resume acquire release force-release hold help" -f -a "force-release" -d 'Take the baton from NODE (audited). Name the token you saw in `status` with --token, so a late command cannot drop a newer grant of the same node; --any-token takes whatever it holds'
complete -c batonctl -n "__fish_batonctl_using_subcommand help; and not __fish_seen_subcommand_from status policy plan pause resume acquire release force-release hold help" -f -a "hold" -d 'Take the baton for NODE, run CMD, release, exit with CMD\'s status'
complete -c batonctl -n "__fish_batonctl_using_subcommand help; and not __fish_seen_subcommand_from status policy plan pause resume acquire release force-release hold help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
