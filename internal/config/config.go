// Package config holds the server's and the client's configuration: typed
// structs with root-gg/wsp's keys and defaults, strict YAML decoding (unknown
// keys are errors naming the key and its line), command-line flags that
// override the file, and Validate methods that name the offending key.
//
// The usual sequence is ConfigPath, Load*, Flags, fs.Parse, Validate: the file
// supplies the flags' defaults, so a flag given on the command line wins.
package config

import (
	"crypto/rand"
	"encoding/hex"
	"net"
	"strconv"
	"time"

	"wsp/internal/rules"
)

// Server is the configuration of `wsp server`.
type Server struct {
	Host        string       `yaml:"host"`        // listen host; "" listens on every interface
	Port        int          `yaml:"port"`        // listen port, 0..65535; 0 picks a free port
	Timeout     Duration     `yaml:"timeout"`     // how long an app request waits for a client able to serve it
	IdleTimeout Duration     `yaml:"idletimeout"` // close client connections idle this long; 0 = never
	Whitelist   []rules.Spec `yaml:"whitelist"`   // an app request must match one of these, when set
	Blacklist   []rules.Spec `yaml:"blacklist"`   // an app request must match none of these
	SecretKey   string       `yaml:"secretkey"`   // shared secret clients must present; "" = none
	KeepAlive   Duration     `yaml:"keepalive"`   // ping interval, > 0; a peer silent for two intervals is dead
	Drain       Duration     `yaml:"drain"`       // how long shutdown waits for in-flight requests; 0 = none
	// DrainNotice is how long, once a drain starts, the server goes on
	// serving with /readyz failing, so load balancers stop sending first.
	DrainNotice Duration `yaml:"drainnotice"`
	LogFormat   string   `yaml:"logformat"` // "text" or "json"
	// MaxHeaderBytes bounds an app request's header; beyond it the answer is 431.
	MaxHeaderBytes int `yaml:"maxheaderbytes"`
	// Routes send requests that name no client to a pool by destination host.
	Routes []Route `yaml:"routes"`

	TLS     ServerTLS    `yaml:"tls"`     // HTTPS and WSS on the server's port
	Clients []ClientCred `yaml:"clients"` // per-client credentials
	Auth    Auth         `yaml:"auth"`    // credentials apps must present; empty = none

	// Limits on what peers and apps control.
	HandshakeTimeout Duration `yaml:"handshaketimeout"` // a request head (app or client handshake) must arrive within this
	MaxSessions      int      `yaml:"maxsessions"`      // client sessions in all
	MaxSessionsPerID int      `yaml:"maxsessionsperid"` // client sessions with one id
	MaxStreams       int      `yaml:"maxstreams"`       // concurrent requests per session, whatever the client offers
	MaxBodyBytes     int      `yaml:"maxbodybytes"`     // largest app request body; 0 = no limit

	Admin     string `yaml:"admin"`     // host:port of the operators' listener (dashboard, metrics, pprof); "" = none
	AdminAuth bool   `yaml:"adminauth"` // the admin listener requires the apps' credentials (auth)

	// Legacy (root-gg/wsp) clients: bodies travel as whole WebSocket
	// messages, bounded by MaxMessageBytes; an answer must come within
	// LegacyTimeout.
	MaxMessageBytes int      `yaml:"maxmessagebytes"`
	LegacyTimeout   Duration `yaml:"legacytimeout"`

	// Cluster is how this node works with other server nodes behind one
	// load balancer (docs/scaling.md).
	Cluster Cluster `yaml:"cluster"`

	src source // where the values came from, for error lines
}

// Route sends requests for matching destinations to one client pool, for
// apps that name no client. The first route that matches wins.
type Route struct {
	Host   string `yaml:"host"`   // unanchored regex on the destination's host[:port] as written
	Client string `yaml:"client"` // the pool id
}

// Cluster configures a server that is one of several nodes. Without redis
// the nodes share nothing and every client holds a session to each (Nodes
// tells clients how many to look for); with redis, nodes record which
// client ids they hold and forward requests for the others.
type Cluster struct {
	// Node names this node in the 101 answer to clients, in Via headers and
	// in the directory; default: the host name and a random suffix.
	Node string `yaml:"node"`
	// Nodes is how many nodes a client should hold a session to; a client
	// that reaches the same node twice through a load balancer keeps
	// trying until it has seen this many. 0 = do not tell clients.
	Nodes     int      `yaml:"nodes"`
	Redis     string   `yaml:"redis"`     // redis://[user:password@]HOST:PORT/DB of the directory; "" = none
	Advertise string   `yaml:"advertise"` // http(s)://host:port other nodes reach this one at; required with redis
	Secret    string   `yaml:"secret"`    // shared by all nodes, authenticates node-to-node requests; literal, env:NAME or file:PATH
	TTL       Duration `yaml:"ttl"`       // a directory entry lives this long after its last heartbeat, >= 1s
}

// Enabled reports whether the node uses a Redis directory.
func (c Cluster) Enabled() bool { return c.Redis != "" }

// ServerTLS turns on HTTPS and WSS on the server's one port.
type ServerTLS struct {
	Cert     string `yaml:"cert"`     // PEM certificate chain file
	Key      string `yaml:"key"`      // PEM private key file
	ClientCA string `yaml:"clientca"` // PEM CA file: clients must present a certificate it signed (mutual TLS)
}

// Enabled reports whether TLS is configured.
func (t ServerTLS) Enabled() bool { return t.Cert != "" || t.Key != "" }

// ClientTLS is how a client verifies servers and proves itself to them.
type ClientTLS struct {
	CA                 string `yaml:"ca"`                 // PEM CA file to verify wss:// servers with, instead of the system roots
	Cert               string `yaml:"cert"`               // PEM client certificate, for mutual TLS
	Key                string `yaml:"key"`                // its PEM private key
	InsecureSkipVerify bool   `yaml:"insecureskipverify"` // accept any server certificate (testing only)
}

// ClientCred binds a token to a client id it may register.
type ClientCred struct {
	ID    string `yaml:"id"`
	Token string `yaml:"token"` // literal, env:NAME or file:PATH
}

// Auth is what apps must present: a bearer token or a user name and
// password (Basic). Values may be env:NAME or file:PATH.
type Auth struct {
	Tokens []string          `yaml:"tokens"`
	Users  map[string]string `yaml:"users"`
}

// Enabled reports whether apps must authenticate.
func (a Auth) Enabled() bool { return len(a.Tokens) > 0 || len(a.Users) > 0 }

// Client is the configuration of `wsp client`.
type Client struct {
	ID           string       `yaml:"id"`           // pool id; clients with the same id form one pool
	Targets      []string     `yaml:"targets"`      // server /register URLs (ws, wss, http or https)
	PoolIdleSize int          `yaml:"poolidlesize"` // accepted for root-gg/wsp compatibility; >= 0
	PoolMaxSize  int          `yaml:"poolmaxsize"`  // max concurrent streams per session; >= 1
	Whitelist    []rules.Spec `yaml:"whitelist"`    // a relayed request must match one of these, when set
	Blacklist    []rules.Spec `yaml:"blacklist"`    // a relayed request must match none of these
	AllowAny     bool         `yaml:"allowany"`     // forward anywhere when no whitelist is set
	SecretKey    string       `yaml:"secretkey"`    // credential sent to the server
	Token        string       `yaml:"token"`        // per-client credential sent to the server (Authorization: Bearer)
	TLS          ClientTLS    `yaml:"tls"`          // verifying wss:// servers, client certificates
	Admin        string       `yaml:"admin"`        // host:port of the operators' listener (metrics, health, pprof); "" = none
	Legacy       bool         `yaml:"legacy"`       // speak root-gg/wsp's protocol, to old servers
	// MaxMessageBytes bounds a whole body in the legacy protocol, where
	// bodies travel as single WebSocket messages.
	MaxMessageBytes int      `yaml:"maxmessagebytes"`
	DialTimeout     Duration `yaml:"dialtimeout"`   // bound on connecting to a destination, > 0
	HeaderTimeout   Duration `yaml:"headertimeout"` // bound on a destination's response headers; 0 = none
	KeepAlive       Duration `yaml:"keepalive"`     // ping interval, > 0
	Drain           Duration `yaml:"drain"`         // how long shutdown waits for in-flight requests; 0 = none
	LogFormat       string   `yaml:"logformat"`     // "text" or "json"
	// Discovery is how often a target's host name is resolved again: the
	// client holds one session to every server node the addresses it
	// resolves to lead to. 0 = dial the name as given, one session per
	// target; otherwise at least a second.
	Discovery Duration `yaml:"discovery"`

	src source // where the values came from, for error lines
}

// Default values, kept together so docs/configuration.md can be checked
// against one place.
const (
	defaultHost           = "127.0.0.1"
	defaultPort           = 8080
	defaultTimeout        = 1000 * time.Millisecond
	defaultIdleTimeout    = 60000 * time.Millisecond
	defaultKeepAlive      = 15 * time.Second
	defaultDrain          = 30 * time.Second
	defaultLogFormat      = "text"
	defaultMaxHeaderBytes = 64 << 10
	defaultTarget         = "ws://127.0.0.1:8080/register"
	defaultPoolIdleSize   = 10
	defaultPoolMaxSize    = 100
	defaultDialTimeout    = 10 * time.Second
	defaultHeaderTimeout  = 60 * time.Second

	defaultHandshakeTimeout = 10 * time.Second
	defaultMaxSessions      = 20000
	defaultMaxSessionsPerID = 1000
	defaultMaxStreams       = 1000
	defaultAdmin            = "127.0.0.1:8081"
	defaultMaxMessageBytes  = 32 << 20
	defaultLegacyTimeout    = 60 * time.Second
	defaultClusterTTL       = 15 * time.Second
	defaultDiscovery        = 30 * time.Second
)

// DefaultServer returns the server's defaults.
func DefaultServer() Server {
	return Server{
		Host:           defaultHost,
		Port:           defaultPort,
		Timeout:        Duration(defaultTimeout),
		IdleTimeout:    Duration(defaultIdleTimeout),
		KeepAlive:      Duration(defaultKeepAlive),
		Drain:          Duration(defaultDrain),
		LogFormat:      defaultLogFormat,
		MaxHeaderBytes: defaultMaxHeaderBytes,

		HandshakeTimeout: Duration(defaultHandshakeTimeout),
		MaxSessions:      defaultMaxSessions,
		MaxSessionsPerID: defaultMaxSessionsPerID,
		MaxStreams:       defaultMaxStreams,
		Admin:            defaultAdmin,
		MaxMessageBytes:  defaultMaxMessageBytes,
		LegacyTimeout:    Duration(defaultLegacyTimeout),
		Cluster:          Cluster{TTL: Duration(defaultClusterTTL)},
	}
}

// DefaultClient returns the client's defaults, with a fresh random ID: a
// client started without one still gets a pool of its own.
func DefaultClient() Client {
	return Client{
		ID:            randomID(),
		Targets:       []string{defaultTarget},
		PoolIdleSize:  defaultPoolIdleSize,
		PoolMaxSize:   defaultPoolMaxSize,
		DialTimeout:   Duration(defaultDialTimeout),
		HeaderTimeout: Duration(defaultHeaderTimeout),
		KeepAlive:     Duration(defaultKeepAlive),
		Drain:         Duration(defaultDrain),
		LogFormat:     defaultLogFormat,

		MaxMessageBytes: defaultMaxMessageBytes,
		Discovery:       Duration(defaultDiscovery),
	}
}

// randomID returns 16 hex characters, enough that two clients started
// without an id never share a pool by accident.
func randomID() string {
	var b [8]byte
	rand.Read(b[:]) // never fails (crypto/rand crashes the program instead)
	return hex.EncodeToString(b[:])
}

// Addr returns the listen address, host:port.
func (c *Server) Addr() string {
	return net.JoinHostPort(c.Host, strconv.Itoa(c.Port))
}
