package config

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"os"
	"regexp"
	"strings"
	"time"

	"wsp/internal/rules"
)

// Validate checks every value, compiling the rules to report bad regular
// expressions and loading the TLS files, and replaces env:NAME and file:PATH
// secrets by what they name. It reports all problems at once; each is an
// *Error naming the key, with its line when the value is still the one read
// from the file.
func (c *Server) Validate() error {
	p := problems{src: &c.src, cfg: c}
	if c.Host != "" && strings.Contains(c.Host, ":") {
		if _, err := netip.ParseAddr(c.Host); err != nil {
			p.add("host", "invalid host %q: want a host name or IP address without a port (set port separately)", c.Host)
		}
	}
	if c.Port < 0 || c.Port > 65535 {
		p.add("port", "must be 0..65535 (0 picks a free port), got %d", c.Port)
	}
	p.positive("timeout", c.Timeout)
	p.notNegative("idletimeout", c.IdleTimeout)
	p.positive("keepalive", c.KeepAlive)
	p.notNegative("drain", c.Drain)
	p.notNegative("drainnotice", c.DrainNotice)
	p.logFormat(c.LogFormat)
	if c.MaxHeaderBytes <= 0 {
		p.add("maxheaderbytes", "must be positive, got %d", c.MaxHeaderBytes)
	}
	p.rules(c.Whitelist, c.Blacklist)
	p.listenAddr("admin", c.Admin)
	p.atLeast("maxmessagebytes", c.MaxMessageBytes, 1024)
	p.positive("legacytimeout", c.LegacyTimeout)
	if c.AdminAuth && !c.Auth.Enabled() {
		p.add("adminauth", "requires auth: the admin listener takes the apps' credentials")
	}
	p.positive("handshaketimeout", c.HandshakeTimeout)
	p.atLeast("maxsessions", c.MaxSessions, 1)
	p.atLeast("maxsessionsperid", c.MaxSessionsPerID, 1)
	p.atLeast("maxstreams", c.MaxStreams, 1)
	p.atLeast("maxbodybytes", c.MaxBodyBytes, 0)
	p.secret("secretkey", &c.SecretKey)
	for i := range c.Clients {
		key := fmt.Sprintf("clients[%d]", i)
		if !clientID.MatchString(c.Clients[i].ID) {
			p.add(key+".id", "invalid client id %q", c.Clients[i].ID)
		}
		if c.Clients[i].Token == "" {
			p.add(key+".token", "missing")
		} else {
			p.secret(key+".token", &c.Clients[i].Token)
		}
	}
	for i := range c.Auth.Tokens {
		key := fmt.Sprintf("auth.tokens[%d]", i)
		if c.Auth.Tokens[i] == "" {
			p.add(key, "empty token")
		} else {
			p.secret(key, &c.Auth.Tokens[i])
		}
	}
	for name, pw := range c.Auth.Users {
		key := "auth.users." + name
		if name == "" || strings.Contains(name, ":") {
			p.add(key, "invalid user name %q: want a non-empty name without ':'", name)
		}
		if pw == "" {
			p.add(key, "empty password")
			continue
		}
		p.secret(key, &pw)
		c.Auth.Users[name] = pw
	}
	if t := c.TLS; t.Enabled() || t.ClientCA != "" {
		switch {
		case t.Cert == "":
			p.add("tls.cert", "missing: tls needs cert and key")
		case t.Key == "":
			p.add("tls.key", "missing: tls needs cert and key")
		default:
			if _, err := tls.LoadX509KeyPair(t.Cert, t.Key); err != nil {
				p.add("tls.cert", "cannot load the key pair: %v", err)
			}
		}
		if t.ClientCA != "" {
			if _, err := LoadCertPool(t.ClientCA); err != nil {
				p.add("tls.clientca", "%v", err)
			}
		}
	}
	c.Cluster.validate(&p)
	for i, r := range c.Routes {
		key := fmt.Sprintf("routes[%d]", i)
		if r.Host == "" {
			p.add(key+".host", "missing: a regular expression matching destination hosts")
		} else if _, err := regexp.Compile(r.Host); err != nil {
			p.add(key+".host", "invalid regular expression %q: %v", r.Host, err)
		}
		if !clientID.MatchString(r.Client) {
			p.add(key+".client", "invalid client id %q: want 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit", r.Client)
		}
	}
	return p.err()
}

var clientID = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// Validate checks every value, compiling the rules to report bad regular
// expressions, and refuses a client that would forward anywhere without
// saying so. It reports all problems at once; each is an *Error naming the key.
func (c *Client) Validate() error {
	p := problems{src: &c.src, cfg: c}
	if !clientID.MatchString(c.ID) {
		p.add("id", "invalid id %q: want 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit", c.ID)
	} else if c.Legacy && strings.Contains(c.ID, "_") {
		p.add("id", "invalid id %q with legacy: true: root-gg/wsp servers split the greeting on '_', so the id cannot contain one", c.ID)
	}
	if len(c.Targets) == 0 {
		p.add("targets", "at least one target is required, e.g. [%s]", defaultTarget)
	}
	for i, t := range c.Targets {
		if msg := checkTarget(t); msg != "" {
			p.add(fmt.Sprintf("targets[%d]", i), "invalid target %q: %s", t, msg)
		}
	}
	if c.PoolIdleSize < 0 {
		p.add("poolidlesize", "must not be negative, got %d", c.PoolIdleSize)
	}
	if c.PoolMaxSize < 1 {
		p.add("poolmaxsize", "must be at least 1, got %d", c.PoolMaxSize)
	}
	p.rules(c.Whitelist, c.Blacklist)
	if len(c.Whitelist) == 0 && !c.AllowAny {
		p.add("whitelist", "no whitelist: the client would forward requests to any host and port "+
			"it can reach, an open door into its network for anyone who can use the server; "+
			"add a whitelist, or set allowany: true (flag -allowany) to accept that")
	}
	p.listenAddr("admin", c.Admin)
	p.atLeast("maxmessagebytes", c.MaxMessageBytes, 1024)
	p.secret("secretkey", &c.SecretKey)
	p.secret("token", &c.Token)
	if t := c.TLS; t.Cert != "" || t.Key != "" {
		if t.Cert == "" || t.Key == "" {
			p.add("tls.cert", "tls.cert and tls.key go together")
		} else if _, err := tls.LoadX509KeyPair(t.Cert, t.Key); err != nil {
			p.add("tls.cert", "cannot load the key pair: %v", err)
		}
	}
	if c.TLS.CA != "" {
		if _, err := LoadCertPool(c.TLS.CA); err != nil {
			p.add("tls.ca", "%v", err)
		}
	}
	p.positive("dialtimeout", c.DialTimeout)
	p.notNegative("headertimeout", c.HeaderTimeout)
	p.positive("keepalive", c.KeepAlive)
	p.notNegative("drain", c.Drain)
	p.notNegative("discovery", c.Discovery)
	if d := c.Discovery.D(); d > 0 && d < minDiscovery {
		// Each lookup also paces the retries of addresses that lead to
		// a node already held: a few milliseconds would hammer DNS and
		// the servers.
		p.add("discovery", "must be at least %s, or 0 for none, got %s", minDiscovery, c.Discovery)
	}
	p.logFormat(c.LogFormat)
	return p.err()
}

// minDiscovery is the shortest discovery interval.
const minDiscovery = time.Second

// LoadCertPool reads a PEM file of CA certificates.
func LoadCertPool(path string) (*x509.CertPool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("%s holds no PEM certificate", path)
	}
	return pool, nil
}

func checkTarget(t string) string {
	u, err := url.Parse(t)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return err.Error()
	}
	switch u.Scheme {
	case "ws", "wss", "http", "https":
	default:
		return "want a ws://, wss://, http:// or https:// URL"
	}
	if u.Host == "" || u.Hostname() == "" {
		return "no host"
	}
	return ""
}

// problems collects Validate's findings.
type problems struct {
	src  *source
	cfg  any // *Server or *Client, to tell whether a value still is the file's
	errs []error
}

func (p *problems) add(key, format string, args ...any) {
	e := &Error{Key: key, Msg: fmt.Sprintf(format, args...)}
	if line := p.src.line(p.cfg, key); line > 0 {
		e.File, e.Line = p.src.file, line
	}
	p.errs = append(p.errs, e)
}

// listenAddr checks an optional host:port to listen on.
func (p *problems) listenAddr(key, addr string) {
	if addr == "" {
		return
	}
	if _, port, err := net.SplitHostPort(addr); err != nil || port == "" {
		p.add(key, "invalid address %q: want host:port, e.g. 127.0.0.1:8081, or \"\" for none", addr)
	}
}

func (p *problems) atLeast(key string, v, least int) {
	if v < least {
		p.add(key, "must be at least %d, got %d", least, v)
	}
}

func (p *problems) positive(key string, d Duration) {
	if d <= 0 {
		p.add(key, "must be positive, got %s", d)
	}
}

func (p *problems) notNegative(key string, d Duration) {
	if d < 0 {
		p.add(key, "must not be negative, got %s", d)
	}
}

func (p *problems) logFormat(f string) {
	if f != "text" && f != "json" {
		p.add("logformat", `invalid value %q: want "text" or "json"`, f)
	}
}

func (p *problems) rules(whitelist, blacklist []rules.Spec) {
	if _, err := rules.NewSet(whitelist, blacklist); err != nil {
		if fe, ok := errors.AsType[*rules.FieldError](err); ok {
			p.add(fe.Field, "%v", fe.Err)
		} else {
			p.add("", "%v", err)
		}
	}
}

// err returns nil, the one problem, or all of them joined; each is an *Error.
func (p *problems) err() error {
	switch len(p.errs) {
	case 0:
		return nil
	case 1:
		return p.errs[0]
	}
	return errors.Join(p.errs...)
}

// validate checks the cluster block: a Redis directory needs an advertised
// URL other nodes can reach and a secret they share.
func (c *Cluster) validate(p *problems) {
	if c.Node != "" && !clientID.MatchString(c.Node) {
		p.add("cluster.node", "invalid node name %q: want 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit", c.Node)
	}
	p.atLeast("cluster.nodes", c.Nodes, 0)
	if c.TTL.D() < time.Second {
		p.add("cluster.ttl", "must be at least 1s, got %s", c.TTL.D())
	}
	if c.Redis == "" {
		if c.Advertise != "" {
			p.add("cluster.advertise", "needs cluster.redis: it is only used with a Redis directory")
		}
		if c.Secret != "" {
			p.add("cluster.secret", "needs cluster.redis: it is only used with a Redis directory")
		}
		return
	}
	// The URL may hold Redis's password: env:NAME and file:PATH keep it
	// out of the file, as for the secrets.
	if r, err := resolveSecret(c.Redis); err != nil {
		p.add("cluster.redis", "%v", err)
	} else if u, err := url.Parse(r); err != nil || (u.Scheme != "redis" && u.Scheme != "rediss") || u.Host == "" {
		p.add("cluster.redis", "invalid URL %q: want redis://HOST:PORT/DB or rediss://HOST:PORT/DB", RedactURL(r))
	} else {
		c.Redis = r
	}
	if c.Advertise == "" {
		p.add("cluster.advertise", "missing: the http(s)://host:port other nodes reach this one at")
	} else if u, err := url.Parse(c.Advertise); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || (u.Path != "" && u.Path != "/") {
		p.add("cluster.advertise", "invalid URL %q: want http://host:port or https://host:port", c.Advertise)
	}
	if c.Secret == "" {
		p.add("cluster.secret", "missing: nodes authenticate each other with it")
	} else {
		p.secret("cluster.secret", &c.Secret)
	}
}

// RedactURL is u with its password hidden, for logs and error messages.
func RedactURL(u string) string {
	if p, err := url.Parse(u); err == nil {
		return p.Redacted()
	}
	return "(unparsable)"
}
