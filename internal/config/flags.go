package config

import (
	"flag"
	"strings"
)

// Flags defines one flag per scalar key of the server, named as the key, with
// the current value (typically read from the file) as its default and c as
// its destination, so a flag given on the command line overrides the file.
func (c *Server) Flags(fs *flag.FlagSet) {
	fs.StringVar(&c.Host, "host", c.Host, "listen `host` (\"\" = every interface)")
	fs.IntVar(&c.Port, "port", c.Port, "listen `port` (0 picks a free port)")
	fs.Var(&c.Timeout, "timeout", "how long an app request waits for a client able to serve it (`duration`: milliseconds or e.g. 1s)")
	fs.Var(&c.IdleTimeout, "idletimeout", "close client connections idle this long, 0 = never (`duration`)")
	fs.Var((*secretValue)(&c.SecretKey), "secretkey", "shared `secret` clients must present (visible to local users in the process list: prefer the config file)")
	fs.Var(&c.KeepAlive, "keepalive", "ping interval; a peer silent for two intervals is dead (`duration`)")
	fs.Var(&c.Drain, "drain", "how long shutdown waits for in-flight requests (`duration`)")
	fs.StringVar(&c.LogFormat, "logformat", c.LogFormat, "log `format`: text or json")
	fs.IntVar(&c.MaxHeaderBytes, "maxheaderbytes", c.MaxHeaderBytes, "largest app request header, in `bytes` (431 beyond)")
	fs.StringVar(&c.Admin, "admin", c.Admin, "`host:port` of the admin listener (dashboard, metrics, pprof); \"\" disables it")
	fs.Var(&c.DrainNotice, "drainnotice", "once a drain starts, go on serving this long with /readyz failing (`duration`)")
	fs.Var(&c.HandshakeTimeout, "handshaketimeout", "a request head (app or client handshake) must arrive within this (`duration`)")
	fs.IntVar(&c.MaxSessions, "maxsessions", c.MaxSessions, "most client sessions in all (`n`)")
	fs.IntVar(&c.MaxSessionsPerID, "maxsessionsperid", c.MaxSessionsPerID, "most client sessions with one id (`n`)")
	fs.IntVar(&c.MaxStreams, "maxstreams", c.MaxStreams, "most concurrent requests per client session, whatever the client offers (`n`)")
	fs.IntVar(&c.MaxBodyBytes, "maxbodybytes", c.MaxBodyBytes, "largest app request body in `bytes`, 0 = no limit (413 beyond)")
	// Per node, where the file is shared (a Kubernetes ConfigMap): the pod's
	// name and address come from the environment, as $(POD_NAME) in args.
	fs.StringVar(&c.Cluster.Node, "cluster.node", c.Cluster.Node, "this node's `name` (default: host name and a random suffix)")
	fs.StringVar(&c.Cluster.Advertise, "cluster.advertise", c.Cluster.Advertise, "with cluster.redis: the http(s)://host:port `URL` other nodes reach this one at")
}

// Flags defines one flag per scalar key of the client, and -targets, as
// Server.Flags does. -targets takes a comma-separated list that replaces the
// file's list.
func (c *Client) Flags(fs *flag.FlagSet) {
	fs.StringVar(&c.ID, "id", c.ID, "pool `id`; clients with the same id share the load")
	fs.Var((*listValue)(&c.Targets), "targets", "comma-separated server `URLs` to connect to (ws, wss, http or https)")
	fs.IntVar(&c.PoolIdleSize, "poolidlesize", c.PoolIdleSize, "with legacy: idle connections kept per server; otherwise accepted for root-gg/wsp compatibility (`n`)")
	fs.IntVar(&c.PoolMaxSize, "poolmaxsize", c.PoolMaxSize, "max concurrent requests per server session (with legacy: connections per server) (`n`)")
	fs.BoolVar(&c.AllowAny, "allowany", c.AllowAny, "forward to any destination when no whitelist is set")
	fs.Var((*secretValue)(&c.SecretKey), "secretkey", "`secret` presented to the server (visible to local users in the process list: prefer the config file)")
	fs.StringVar(&c.Admin, "admin", c.Admin, "`host:port` of the admin listener (metrics, health, pprof); \"\" = none")
	fs.BoolVar(&c.Legacy, "legacy", c.Legacy, "speak root-gg/wsp's protocol, to an old server")
	fs.Var((*secretValue)(&c.Token), "token", "per-client `token` presented to the server; env:NAME or file:PATH keep it out of the process list")
	fs.Var(&c.DialTimeout, "dialtimeout", "bound on connecting to a destination (`duration`: milliseconds or e.g. 10s)")
	fs.Var(&c.HeaderTimeout, "headertimeout", "bound on waiting for a destination's response headers, 0 = none (`duration`)")
	fs.Var(&c.KeepAlive, "keepalive", "ping interval; a peer silent for two intervals is dead (`duration`)")
	fs.Var(&c.Drain, "drain", "how long shutdown waits for in-flight requests (`duration`)")
	fs.StringVar(&c.LogFormat, "logformat", c.LogFormat, "log `format`: text or json")
	fs.Var(&c.Discovery, "discovery", "re-resolve each target's host this often and hold a session to every node its addresses lead to; 0 = dial the name as given, else at least 1s (`duration`)")
}

// ConfigPath pre-scans args for -config or --config, in the "-config X" and
// "-config=X" forms, so the file can be loaded before the flags are defined
// with its values as defaults. Like the flag package, the last one wins and
// "--" ends the flags. It returns "" when there is none. The caller still
// defines a -config flag so that fs.Parse accepts it.
func ConfigPath(args []string) string {
	path := ""
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			break
		}
		name, value, hasValue := strings.Cut(a, "=")
		if name != "-config" && name != "--config" {
			continue
		}
		if hasValue {
			path = value
		} else if i+1 < len(args) {
			i++
			path = args[i]
		}
	}
	return path
}

// secretValue is a string flag whose value never appears in -h output,
// where the default would otherwise show the secret read from the file.
type secretValue string

func (s *secretValue) String() string { return "" }

func (s *secretValue) Set(v string) error {
	*s = secretValue(v)
	return nil
}

// listValue is a comma-separated list flag; setting it replaces the list.
type listValue []string

func (l *listValue) String() string {
	if l == nil {
		return ""
	}
	return strings.Join(*l, ",")
}

func (l *listValue) Set(v string) error {
	var list []string
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			list = append(list, s)
		}
	}
	*l = list
	return nil
}
