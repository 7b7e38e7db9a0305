package config

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"wsp/internal/rules"
)

func writeFile(t *testing.T, name, data string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// asError fails the test unless err is, or wraps, a *Error.
func asError(t *testing.T, err error) *Error {
	t.Helper()
	e, ok := errors.AsType[*Error](err)
	if !ok {
		t.Fatalf("error %v (%T) is not a *Error", err, err)
	}
	return e
}

func TestDefaults(t *testing.T) {
	s, err := LoadServer("")
	if err != nil {
		t.Fatal(err)
	}
	want := Server{
		Host: "127.0.0.1", Port: 8080,
		Timeout: Duration(time.Second), IdleTimeout: Duration(time.Minute),
		KeepAlive: Duration(15 * time.Second), Drain: Duration(30 * time.Second),
		LogFormat: "text", MaxHeaderBytes: 64 << 10,
		HandshakeTimeout: Duration(10 * time.Second),
		MaxSessions:      20000, MaxSessionsPerID: 1000, MaxStreams: 1000,
		Admin: "127.0.0.1:8081", MaxMessageBytes: 32 << 20, LegacyTimeout: Duration(time.Minute),
		Cluster: Cluster{TTL: Duration(15 * time.Second)},
	}
	if !reflect.DeepEqual(s, want) {
		t.Errorf("LoadServer(\"\") = %+v, want %+v", s, want)
	}
	if err := s.Validate(); err != nil {
		t.Errorf("defaults do not validate: %v", err)
	}
	if got := s.Addr(); got != "127.0.0.1:8080" {
		t.Errorf("Addr() = %q", got)
	}

	c, err := LoadClient("")
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`^[0-9a-f]{16}$`).MatchString(c.ID) {
		t.Errorf("default id %q is not 16 hex characters", c.ID)
	}
	if other := DefaultClient(); other.ID == c.ID {
		t.Errorf("two default clients share id %q", c.ID)
	}
	c.ID = ""
	wantClient := Client{
		Targets:      []string{"ws://127.0.0.1:8080/register"},
		PoolIdleSize: 10, PoolMaxSize: 100,
		DialTimeout: Duration(10 * time.Second), HeaderTimeout: Duration(time.Minute),
		KeepAlive: Duration(15 * time.Second), Drain: Duration(30 * time.Second),
		LogFormat: "text", MaxMessageBytes: 32 << 20,
		Discovery: Duration(30 * time.Second),
	}
	if !reflect.DeepEqual(c, wantClient) {
		t.Errorf("LoadClient(\"\") = %+v, want %+v", c, wantClient)
	}
}

func TestEmptyFiles(t *testing.T) {
	for _, data := range []string{"", "\n", "# nothing set\n", "---\n", "~\n"} {
		s, err := decodeServer([]byte(data), "server.yaml")
		if err != nil {
			t.Errorf("%q: %v", data, err)
			continue
		}
		if s.Port != 8080 || s.Timeout.D() != time.Second {
			t.Errorf("%q: defaults lost: %+v", data, s)
		}
		c, err := decodeClient([]byte(data), "client.yaml")
		if err != nil || len(c.ID) != 16 {
			t.Errorf("%q: client = %+v, %v", data, c, err)
		}
	}
}

func TestLoadServerFile(t *testing.T) {
	// A root-gg/wsp wsp_server.cfg, unchanged.
	path := writeFile(t, "wsp_server.cfg", `---
host : 0.0.0.0
port : 8080
timeout : 1000
idletimeout : 60000
whitelist :
  - method : "^GET$"
    url : "^http(s)?://.+\\.google\\.com/.+"
    headers :
      X-CUSTOM-HEADER : "^value$"
blacklist :
  - url : "^http://localhost"
secretkey : ThisIsASecret
`)
	s, err := LoadServer(path)
	if err != nil {
		t.Fatal(err)
	}
	if s.Host != "0.0.0.0" || s.Port != 8080 || s.SecretKey != "ThisIsASecret" {
		t.Errorf("scalars: %+v", s)
	}
	if s.Timeout.D() != time.Second || s.IdleTimeout.D() != time.Minute {
		t.Errorf("durations: %v %v", s.Timeout, s.IdleTimeout)
	}
	wantWhite := []rules.Spec{{Method: "^GET$", URL: `^http(s)?://.+\.google\.com/.+`, Headers: map[string]string{"X-CUSTOM-HEADER": "^value$"}}}
	if !reflect.DeepEqual(s.Whitelist, wantWhite) {
		t.Errorf("whitelist = %#v", s.Whitelist)
	}
	if len(s.Blacklist) != 1 || s.Blacklist[0].URL != "^http://localhost" {
		t.Errorf("blacklist = %#v", s.Blacklist)
	}
	if s.KeepAlive.D() != 15*time.Second || s.LogFormat != "text" {
		t.Errorf("unset keys lost their defaults: %+v", s)
	}
	if err := s.Validate(); err != nil {
		t.Error(err)
	}
}

func TestLoadClientFile(t *testing.T) {
	path := writeFile(t, "wsp_client.cfg", `
id: dc1
targets:
  - ws://wsp.example.com:8080/register
  - wss://wsp2.example.com/register
poolidlesize: 1
poolmaxsize: 50
secretkey: "0123"
dialtimeout: 2s
headertimeout: 0
whitelist:
  - url: ^http://api\.internal/
`)
	c, err := LoadClient(path)
	if err != nil {
		t.Fatal(err)
	}
	if c.ID != "dc1" || len(c.Targets) != 2 || c.Targets[1] != "wss://wsp2.example.com/register" {
		t.Errorf("id/targets: %+v", c)
	}
	if c.PoolIdleSize != 1 || c.PoolMaxSize != 50 || c.SecretKey != "0123" {
		t.Errorf("ints/secret: %+v", c)
	}
	if c.DialTimeout.D() != 2*time.Second || c.HeaderTimeout != 0 || c.KeepAlive.D() != 15*time.Second {
		t.Errorf("durations: %+v", c)
	}
	if err := c.Validate(); err != nil {
		t.Error(err)
	}
}

func TestLoadMissingFile(t *testing.T) {
	_, err := LoadServer(filepath.Join(t.TempDir(), "nope.yaml"))
	asError(t, err)
	if !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("error %v does not wrap fs.ErrNotExist", err)
	}
	_, err = LoadClient(filepath.Join(t.TempDir(), "nope.yaml"))
	asError(t, err)
}

func TestScalarsAsWritten(t *testing.T) {
	s, err := decodeServer([]byte("secretkey: 0123\nhost: 10\nport: \"9000\"\n"), "s.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if s.SecretKey != "0123" || s.Host != "10" || s.Port != 9000 {
		t.Errorf("got %+v", s)
	}
	// A null value keeps the default, as if the key were absent.
	s, err = decodeServer([]byte("port:\ntimeout: ~\n"), "s.yaml")
	if err != nil || s.Port != 8080 || s.Timeout.D() != time.Second {
		t.Errorf("null values: %+v, %v", s, err)
	}
	// Aliases work, e.g. one rule list shared by both sides.
	c, err := decodeClient([]byte("whitelist: &w\n  - url: a\nblacklist: *w\ntargets: [&t ws://a/register, *t]\n"), "c.yaml")
	if err != nil || len(c.Blacklist) != 1 || c.Blacklist[0].URL != "a" || c.Targets[1] != "ws://a/register" {
		t.Errorf("aliases: %+v, %v", c, err)
	}
	// An explicitly empty id still gets a random one.
	c, err = decodeClient([]byte("id: ''\n"), "c.yaml")
	if err != nil || len(c.ID) != 16 {
		t.Errorf("empty id: %+v, %v", c, err)
	}
}

func TestDecodeErrors(t *testing.T) {
	tests := []struct {
		name   string
		client bool
		data   string
		want   string // the whole Error() text
	}{
		{"unknown key", false, "host: a\nport: 1\n\n\n\n\nfooo: 1\n", `config: server.yaml: line 7: unknown key "fooo"`},
		{"client key on server", false, "targets: [ws://a/]\n", `config: server.yaml: line 1: unknown key "targets"`},
		{"key case matters", false, "Port: 1\n", `config: server.yaml: line 1: unknown key "Port"`},
		{"unknown key in rule", false, "whitelist:\n  - url: a\n  - urll: b\n", `config: server.yaml: line 3: whitelist[1]: unknown key "urll"`},
		{"duplicate key", false, "port: 1\nport: 2\n", `config: server.yaml: line 2: duplicate key "port" (first at line 1)`},
		{"duplicate header", true, "whitelist:\n- headers:\n    A: x\n    A: y\n", `config: client.yaml: line 4: whitelist[0].headers: duplicate header "A" (first at line 3)`},
		{"bad duration", false, "host: a\n\n\ntimeout: abc\n", `config: server.yaml: line 4: timeout: invalid duration "abc": want milliseconds (1000) or a Go duration (1s)`},
		{"negative duration", true, "drain: -1\n", `config: client.yaml: line 1: drain: invalid duration "-1": must not be negative`},
		{"port not integer", false, "port: http\n", `config: server.yaml: line 1: port: invalid integer "http"`},
		{"port float", false, "port: 80.5\n", `config: server.yaml: line 1: port: invalid integer "80.5"`},
		{"port huge", false, "port: 99999999999999999999999\n", `config: server.yaml: line 1: port: invalid integer "99999999999999999999999"`},
		{"port list", false, "port: [1]\n", `config: server.yaml: line 1: port: want an integer, got a list`},
		{"bool", true, "allowany: maybe\n", `config: client.yaml: line 1: allowany: invalid value "maybe": want true or false`},
		{"host mapping", false, "host: {a: b}\n", `config: server.yaml: line 1: host: want a string, got a mapping`},
		{"targets scalar", true, "targets: ws://a/register\n", `config: client.yaml: line 1: targets: want a list of strings, got "ws://a/register"`},
		{"target mapping", true, "targets:\n  - {a: b}\n", `config: client.yaml: line 2: targets[0]: want a string, got a mapping`},
		{"whitelist mapping", false, "whitelist: {url: a}\n", `config: server.yaml: line 1: whitelist: want a list, each element a rule ({method: REGEX, url: REGEX, headers: {NAME: REGEX}}), got a mapping`},
		{"rule scalar", false, "blacklist:\n  - ^GET$\n", `config: server.yaml: line 2: blacklist[0]: want a rule ({method: REGEX, url: REGEX, headers: {NAME: REGEX}}), got "^GET$"`},
		{"rule null", false, "blacklist:\n  -\n", `config: server.yaml: line 2: blacklist[0]: want a rule`},
		{"headers list", false, "whitelist:\n  - headers: [a]\n", `config: server.yaml: line 2: whitelist[0].headers: want a mapping of header names to regular expressions, got a list`},
		{"top-level list", false, "- port: 1\n", `config: server.yaml: line 1: want a mapping of keys at the top level, got a list`},
		{"top-level scalar", false, "hello\n", `config: server.yaml: line 1: want a mapping of keys at the top level, got "hello"`},
		{"key mapping", false, "? {a: b}\n: c\n", `config: server.yaml: line 1: want a key name, got a mapping`},
		{"invalid yaml", false, "port: 1\nhost: [a\n", `config: server.yaml: line 2: invalid YAML: did not find expected ',' or ']'`},
		{"tab indent", false, "whitelist:\n\t- url: a\n", `config: server.yaml: line 2: invalid YAML: found character that cannot start any token`},
		{"two documents", false, "port: 1\n---\nport: 2\n", `config: server.yaml: line 3: a second YAML document: want one`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var err error
			if tt.client {
				_, err = decodeClient([]byte(tt.data), "client.yaml")
			} else {
				_, err = decodeServer([]byte(tt.data), "server.yaml")
			}
			if err == nil {
				t.Fatal("no error")
			}
			asError(t, err)
			if !strings.HasPrefix(err.Error(), tt.want) {
				t.Errorf("error:\n got %s\nwant %s", err, tt.want)
			}
		})
	}
}

func TestErrorFormat(t *testing.T) {
	tests := []struct {
		e    Error
		want string
	}{
		{Error{Msg: "m"}, "config: m"},
		{Error{Key: "port", Msg: "m"}, "config: port: m"},
		{Error{Key: "timeout", Line: 3, Msg: `invalid duration "x"`}, `config: line 3: timeout: invalid duration "x"`},
		{Error{Key: "whitelist[0].url", Line: 9, File: "s.yaml", Msg: "m"}, "config: s.yaml: line 9: whitelist[0].url: m"},
	}
	for _, tt := range tests {
		if got := tt.e.Error(); got != tt.want {
			t.Errorf("got %q, want %q", got, tt.want)
		}
	}
}

// checkProblem asserts that err holds a *Error for key whose text contains msg.
func checkProblem(t *testing.T, err error, key, msg string) {
	t.Helper()
	if err == nil {
		t.Fatalf("no error, want one for %q", key)
	}
	var all []error
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		all = j.Unwrap()
	} else {
		all = []error{err}
	}
	for _, e := range all {
		ce := asError(t, e)
		if ce.Key == key && strings.Contains(ce.Error(), msg) {
			return
		}
	}
	t.Errorf("error %q has no problem for key %q containing %q", err, key, msg)
}

func TestServerValidate(t *testing.T) {
	tests := []struct {
		name   string
		change func(*Server)
		key    string // "" = valid
		msg    string
	}{
		{"defaults", func(*Server) {}, "", ""},
		{"port 0 picks a free port", func(s *Server) { s.Port = 0 }, "", ""},
		{"port 65535", func(s *Server) { s.Port = 65535 }, "", ""},
		{"port negative", func(s *Server) { s.Port = -1 }, "port", "must be 0..65535"},
		{"port too large", func(s *Server) { s.Port = 65536 }, "port", "got 65536"},
		{"empty host", func(s *Server) { s.Host = "" }, "", ""},
		{"ipv6 host", func(s *Server) { s.Host = "::1" }, "", ""},
		{"host with port", func(s *Server) { s.Host = "0.0.0.0:80" }, "host", "without a port"},
		{"json logs", func(s *Server) { s.LogFormat = "json" }, "", ""},
		{"logformat", func(s *Server) { s.LogFormat = "xml" }, "logformat", `invalid value "xml": want "text" or "json"`},
		{"empty logformat", func(s *Server) { s.LogFormat = "" }, "logformat", `invalid value ""`},
		{"timeout zero", func(s *Server) { s.Timeout = 0 }, "timeout", "must be positive"},
		{"idletimeout zero is never", func(s *Server) { s.IdleTimeout = 0 }, "", ""},
		{"idletimeout negative", func(s *Server) { s.IdleTimeout = -1 }, "idletimeout", "must not be negative"},
		{"keepalive zero", func(s *Server) { s.KeepAlive = 0 }, "keepalive", "must be positive"},
		{"drain zero", func(s *Server) { s.Drain = 0 }, "", ""},
		{"maxheaderbytes", func(s *Server) { s.MaxHeaderBytes = 0 }, "maxheaderbytes", "must be positive"},
		{"bad whitelist regex", func(s *Server) { s.Whitelist = []rules.Spec{{}, {URL: "("}} }, "whitelist[1].url", `invalid regular expression "("`},
		{"bad blacklist header", func(s *Server) { s.Blacklist = []rules.Spec{{Headers: map[string]string{"X-A": "["}}} }, "blacklist[0].headers.X-A", "invalid regular expression"},
		{"cluster nodes", func(s *Server) { s.Cluster.Nodes = 3; s.Cluster.Node = "a-1" }, "", ""},
		{"cluster node name", func(s *Server) { s.Cluster.Node = "a b" }, "cluster.node", `invalid node name "a b"`},
		{"cluster nodes negative", func(s *Server) { s.Cluster.Nodes = -1 }, "cluster.nodes", "at least 0"},
		{"cluster redis", func(s *Server) {
			s.Cluster = Cluster{Redis: "redis://127.0.0.1:6379/0", Advertise: "http://10.0.0.1:8080", Secret: "s", TTL: Duration(5 * time.Second)}
		}, "", ""},
		{"cluster redis scheme", func(s *Server) {
			s.Cluster = Cluster{Redis: "http://u:pw@127.0.0.1:6379", Advertise: "http://10.0.0.1:8080", Secret: "s", TTL: Duration(5 * time.Second)}
		}, "cluster.redis", `invalid URL "http://u:xxxxx@127.0.0.1:6379"`},
		{"cluster advertise missing", func(s *Server) { s.Cluster.Redis = "redis://127.0.0.1:6379"; s.Cluster.Secret = "s" }, "cluster.advertise", "missing"},
		{"cluster advertise path", func(s *Server) {
			s.Cluster = Cluster{Redis: "redis://r:6379", Advertise: "http://n1:8080/x", Secret: "s", TTL: Duration(5 * time.Second)}
		}, "cluster.advertise", "want http://host:port"},
		{"cluster secret missing", func(s *Server) { s.Cluster.Redis = "redis://127.0.0.1:6379"; s.Cluster.Advertise = "http://n1:8080" }, "cluster.secret", "missing"},
		{"cluster secret without redis", func(s *Server) { s.Cluster.Secret = "s" }, "cluster.secret", "needs cluster.redis"},
		{"cluster ttl", func(s *Server) { s.Cluster.TTL = Duration(time.Millisecond) }, "cluster.ttl", "at least 1s"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := DefaultServer()
			tt.change(&s)
			err := s.Validate()
			if tt.key == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			checkProblem(t, err, tt.key, tt.msg)
		})
	}
}

func TestClientValidate(t *testing.T) {
	tests := []struct {
		name   string
		change func(*Client)
		key    string // "" = valid
		msg    string
	}{
		{"allowany", func(*Client) {}, "", ""},
		{"whitelist without allowany", func(c *Client) { c.AllowAny, c.Whitelist = false, []rules.Spec{{URL: "internal"}} }, "", ""},
		{"no whitelist, no allowany", func(c *Client) { c.AllowAny = false }, "whitelist", "allowany: true"},
		{"blacklist alone is not enough", func(c *Client) { c.AllowAny, c.Blacklist = false, []rules.Spec{{URL: "admin"}} }, "whitelist", "open door"},
		{"id dotted", func(c *Client) { c.ID = "dc1.eu-west_2" }, "", ""},
		{"id max length", func(c *Client) { c.ID = strings.Repeat("a", 128) }, "", ""},
		{"id too long", func(c *Client) { c.ID = strings.Repeat("a", 129) }, "id", "invalid id"},
		{"id empty", func(c *Client) { c.ID = "" }, "id", `invalid id ""`},
		{"id leading dash", func(c *Client) { c.ID = "-dc1" }, "id", "invalid id"},
		{"id slash", func(c *Client) { c.ID = "dc/1" }, "id", "invalid id"},
		{"id newline", func(c *Client) { c.ID = "dc1\n" }, "id", "invalid id"},
		{"targets all schemes", func(c *Client) {
			c.Targets = []string{"ws://a/register", "wss://a:443/register", "http://10.0.0.1:8080/register", "https://[::1]/register", "WS://A/register"}
		}, "", ""},
		{"no targets", func(c *Client) { c.Targets = nil }, "targets", "at least one target"},
		{"target scheme", func(c *Client) { c.Targets = []string{"ws://a/register", "tcp://a:80"} }, "targets[1]", `invalid target "tcp://a:80": want a ws://`},
		{"target without scheme", func(c *Client) { c.Targets = []string{"wsp.example.com:8080"} }, "targets[0]", "want a ws://"},
		{"target without host", func(c *Client) { c.Targets = []string{"ws:///register"} }, "targets[0]", "no host"},
		{"target port only", func(c *Client) { c.Targets = []string{"ws://:8080/register"} }, "targets[0]", "no host"},
		{"target unparsable", func(c *Client) { c.Targets = []string{"ws://a b/"} }, "targets[0]", "invalid target"},
		{"poolidlesize zero", func(c *Client) { c.PoolIdleSize = 0 }, "", ""},
		{"poolidlesize negative", func(c *Client) { c.PoolIdleSize = -1 }, "poolidlesize", "must not be negative"},
		{"poolmaxsize zero", func(c *Client) { c.PoolMaxSize = 0 }, "poolmaxsize", "at least 1"},
		{"dialtimeout zero", func(c *Client) { c.DialTimeout = 0 }, "dialtimeout", "must be positive"},
		{"headertimeout zero is none", func(c *Client) { c.HeaderTimeout = 0 }, "", ""},
		{"keepalive zero", func(c *Client) { c.KeepAlive = 0 }, "keepalive", "must be positive"},
		{"discovery off", func(c *Client) { c.Discovery = 0 }, "", ""},
		{"discovery negative", func(c *Client) { c.Discovery = -1 }, "discovery", "must not be negative"},
		{"discovery below a second", func(c *Client) { c.Discovery = Duration(999 * time.Millisecond) }, "discovery", "must be at least 1s, or 0 for none, got 999ms"},
		{"discovery one second", func(c *Client) { c.Discovery = Duration(time.Second) }, "", ""},
		{"logformat", func(c *Client) { c.LogFormat = "JSON" }, "logformat", "want"},
		{"bad rule", func(c *Client) { c.Whitelist = []rules.Spec{{Method: "(GET"}} }, "whitelist[0].method", "invalid regular expression"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := DefaultClient()
			c.AllowAny = true
			tt.change(&c)
			err := c.Validate()
			if tt.key == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			checkProblem(t, err, tt.key, tt.msg)
		})
	}
}

func TestValidateReportsAll(t *testing.T) {
	s := DefaultServer()
	s.Port, s.LogFormat = -1, "xml"
	err := s.Validate()
	checkProblem(t, err, "port", "must be")
	checkProblem(t, err, "logformat", "xml")
}

func TestValidateLines(t *testing.T) {
	data := `host: 0.0.0.0
port: 70000
whitelist:
  - url: ok
  - method: GET
    url: "("
logformat: xml
`
	s, err := decodeServer([]byte(data), "server.yaml")
	if err != nil {
		t.Fatal(err)
	}
	err = s.Validate()
	for _, want := range []string{
		"config: server.yaml: line 2: port: must be 0..65535",
		`config: server.yaml: line 6: whitelist[1].url: invalid regular expression "(": missing closing )`,
		`config: server.yaml: line 7: logformat: invalid value "xml"`,
	} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not contain %q", err, want)
		}
	}

	// Once a flag changes a value, the file's line no longer explains it.
	fs := flag.NewFlagSet("server", flag.ContinueOnError)
	s.Flags(fs)
	if err := fs.Parse([]string{"-port", "-5"}); err != nil {
		t.Fatal(err)
	}
	err = s.Validate()
	checkProblem(t, err, "port", "config: port: must be 0..65535 (0 picks a free port), got -5")
	checkProblem(t, err, "logformat", "config: server.yaml: line 7: logformat")

	c, err := decodeClient([]byte("id: dc1\ntargets:\n  - ws://a/register\n  - ftp://b\nwhitelist: []\n"), "client.yaml")
	if err != nil {
		t.Fatal(err)
	}
	err = c.Validate()
	checkProblem(t, err, "targets[1]", `config: client.yaml: line 4: targets[1]: invalid target "ftp://b"`)
	checkProblem(t, err, "whitelist", "config: client.yaml: line 5: whitelist: no whitelist")
}

func TestFlagsOverrideFile(t *testing.T) {
	path := writeFile(t, "server.yaml", "host: 0.0.0.0\nport: 9000\ntimeout: 5000\nsecretkey: s3cret\n")
	s, err := LoadServer(path)
	if err != nil {
		t.Fatal(err)
	}
	fs := flag.NewFlagSet("server", flag.ContinueOnError)
	s.Flags(fs)
	if got := fs.Lookup("port").DefValue; got != "9000" {
		t.Errorf("-port default = %q, want the file's 9000", got)
	}
	if got := fs.Lookup("timeout").DefValue; got != "5s" {
		t.Errorf("-timeout default = %q, want the file's 5s", got)
	}
	args := []string{"-port", "9100", "-timeout=250ms", "-idletimeout", "0", "-logformat", "json",
		"-keepalive", "1s", "-drain", "2000", "-maxheaderbytes", "1024", "-secretkey", "other"}
	if err := fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	if s.Host != "0.0.0.0" {
		t.Errorf("host = %q, want the file's value", s.Host)
	}
	if s.Port != 9100 || s.Timeout.D() != 250*time.Millisecond || s.IdleTimeout != 0 || s.LogFormat != "json" ||
		s.KeepAlive.D() != time.Second || s.Drain.D() != 2*time.Second || s.MaxHeaderBytes != 1024 || s.SecretKey != "other" {
		t.Errorf("flags not applied: %+v", s)
	}
	if err := s.Validate(); err != nil {
		t.Error(err)
	}
	if err := fs.Parse([]string{"-timeout", "soon"}); err == nil || !strings.Contains(err.Error(), "want milliseconds") {
		t.Errorf("bad duration flag: %v", err)
	}
	if err := fs.Parse([]string{"-host", "::1"}); err != nil || s.Addr() != "[::1]:9100" {
		t.Errorf("Addr() = %q, %v", s.Addr(), err)
	}
}

func TestClientFlags(t *testing.T) {
	path := writeFile(t, "client.yaml", "id: dc1\ntargets: [ws://a/register, ws://b/register]\npoolmaxsize: 7\n")
	c, err := LoadClient(path)
	if err != nil {
		t.Fatal(err)
	}
	fs := flag.NewFlagSet("client", flag.ContinueOnError)
	c.Flags(fs)
	if got := fs.Lookup("targets").DefValue; got != "ws://a/register,ws://b/register" {
		t.Errorf("-targets default = %q", got)
	}
	args := []string{"-id", "dc2", "-targets", "wss://x/register, wss://y/register,", "-allowany", "-poolidlesize", "0",
		"-dialtimeout", "3s", "-headertimeout", "0", "-keepalive", "5s", "-drain", "0", "-logformat", "json", "-secretkey", "k"}
	if err := fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	if c.ID != "dc2" || !slices.Equal(c.Targets, []string{"wss://x/register", "wss://y/register"}) || !c.AllowAny {
		t.Errorf("flags not applied: %+v", c)
	}
	if c.PoolIdleSize != 0 || c.PoolMaxSize != 7 || c.DialTimeout.D() != 3*time.Second || c.HeaderTimeout != 0 ||
		c.KeepAlive.D() != 5*time.Second || c.Drain != 0 || c.LogFormat != "json" || c.SecretKey != "k" {
		t.Errorf("flags not applied: %+v", c)
	}
	if err := c.Validate(); err != nil {
		t.Error(err)
	}
}

func TestFlagsNames(t *testing.T) {
	var s Server
	fs := flag.NewFlagSet("server", flag.ContinueOnError)
	s.Flags(fs)
	var got []string
	fs.VisitAll(func(f *flag.Flag) { got = append(got, f.Name) })
	want := []string{"admin", "cluster.advertise", "cluster.node", "drain", "drainnotice", "handshaketimeout", "host", "idletimeout", "keepalive", "logformat", "maxbodybytes", "maxheaderbytes", "maxsessions", "maxsessionsperid", "maxstreams", "port", "secretkey", "timeout"}
	if !slices.Equal(got, want) {
		t.Errorf("server flags = %v, want %v", got, want)
	}

	var c Client
	fs = flag.NewFlagSet("client", flag.ContinueOnError)
	c.Flags(fs)
	got = nil
	fs.VisitAll(func(f *flag.Flag) { got = append(got, f.Name) })
	want = []string{"admin", "allowany", "dialtimeout", "discovery", "drain", "headertimeout", "id", "keepalive", "legacy", "logformat", "poolidlesize", "poolmaxsize", "secretkey", "targets", "token"}
	if !slices.Equal(got, want) {
		t.Errorf("client flags = %v, want %v", got, want)
	}
}

func TestHelpHidesSecret(t *testing.T) {
	s := DefaultServer()
	s.SecretKey = "hunter2"
	fs := flag.NewFlagSet("server", flag.ContinueOnError)
	var out bytes.Buffer
	fs.SetOutput(&out)
	s.Flags(fs)
	fs.PrintDefaults()
	if strings.Contains(out.String(), "hunter2") {
		t.Errorf("-h shows the secret:\n%s", out.String())
	}
	if !strings.Contains(out.String(), "-secretkey secret") || !strings.Contains(out.String(), "-timeout duration") {
		t.Errorf("-h output lacks value names:\n%s", out.String())
	}
}

func TestConfigPath(t *testing.T) {
	tests := []struct {
		args []string
		want string
	}{
		{nil, ""},
		{[]string{"-port", "1"}, ""},
		{[]string{"-config", "a.yaml"}, "a.yaml"},
		{[]string{"--config", "a.yaml"}, "a.yaml"},
		{[]string{"-config=a.yaml"}, "a.yaml"},
		{[]string{"--config=a=b.yaml"}, "a=b.yaml"},
		{[]string{"-port", "1", "-config", "a.yaml", "-host", "h"}, "a.yaml"},
		{[]string{"-config", "a.yaml", "-config=b.yaml"}, "b.yaml"},
		{[]string{"-config="}, ""},
		{[]string{"-config"}, ""},
		{[]string{"-configx", "a.yaml"}, ""},
		{[]string{"-- config", "a.yaml"}, ""},
		{[]string{"--", "-config", "a.yaml"}, ""},
	}
	for _, tt := range tests {
		if got := ConfigPath(tt.args); got != tt.want {
			t.Errorf("ConfigPath(%q) = %q, want %q", tt.args, got, tt.want)
		}
	}
}

func TestAliasExpansionBounded(t *testing.T) {
	var b strings.Builder
	b.WriteString("whitelist:\n  - headers: &h {")
	for i := range 1000 {
		fmt.Fprintf(&b, "H%d: x, ", i)
	}
	b.WriteString("}\n")
	for range 300 {
		b.WriteString("  - headers: *h\n")
	}
	_, err := decodeServer([]byte(b.String()), "bomb.yaml")
	if err == nil || !strings.Contains(err.Error(), "too many values once aliases are expanded") {
		t.Errorf("error = %v, want the expansion bound", err)
	}
	asError(t, err)
}

func TestRoutes(t *testing.T) {
	cfg, err := decodeServer([]byte("routes:\n  - host: '^db\\.internal'\n    client: dc1\n  - {host: '\\.eu\\.', client: eu}\n"), "server.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.Routes) != 2 || cfg.Routes[0] != (Route{Host: `^db\.internal`, Client: "dc1"}) || cfg.Routes[1].Client != "eu" {
		t.Fatalf("routes %+v", cfg.Routes)
	}
	for _, tc := range []struct{ yaml, want string }{
		{"routes:\n  - host: '('\n    client: dc1\n", "routes[0].host: invalid regular expression"},
		{"routes:\n  - host: x\n    client: 'bad id'\n", "routes[0].client: invalid client id"},
		{"routes:\n  - client: dc1\n", "routes[0].host: missing"},
		{"routes:\n  - host: x\n    clinet: dc1\n", `unknown key "clinet"`},
	} {
		cfg, err := decodeServer([]byte(tc.yaml), "server.yaml")
		if err == nil {
			err = cfg.Validate()
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: got %v, want %q", tc.yaml, err, tc.want)
		}
	}
}

func TestSecretsFromEnvAndFiles(t *testing.T) {
	t.Setenv("WSP_TEST_TOKEN", "from-env")
	file := filepath.Join(t.TempDir(), "secret")
	os.WriteFile(file, []byte("from-file\n"), 0o600)
	cfg, err := decodeServer([]byte(fmt.Sprintf("secretkey: file:%s\nclients:\n  - {id: dc1, token: env:WSP_TEST_TOKEN}\nauth:\n  tokens: [literal]\n  users: {bob: 'env:WSP_TEST_TOKEN'}\n", file)), "server.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	if cfg.SecretKey != "from-file" || cfg.Clients[0].Token != "from-env" || cfg.Auth.Tokens[0] != "literal" || cfg.Auth.Users["bob"] != "from-env" {
		t.Fatalf("secrets not resolved: %q %q %q %q", cfg.SecretKey, cfg.Clients[0].Token, cfg.Auth.Tokens[0], cfg.Auth.Users["bob"])
	}
	for _, tc := range []struct{ yaml, want string }{
		{"secretkey: env:WSP_TEST_UNSET\n", "secretkey: environment variable WSP_TEST_UNSET is not set"},
		{"secretkey: file:/nonexistent/wsp\n", "secretkey: reading /nonexistent/wsp"},
		{"clients:\n  - {id: dc1}\n", "clients[0].token: missing"},
		{"auth:\n  users: {'a:b': pw}\n", "invalid user name"},
		{"tls:\n  cert: x.pem\n", "tls.key: missing"},
		{"tls:\n  cert: /nonexistent.pem\n  key: /nonexistent-key.pem\n", "tls.cert: cannot load the key pair"},
		{"maxsessions: 0\n", "maxsessions: must be at least 1"},
	} {
		cfg, err := decodeServer([]byte(tc.yaml), "server.yaml")
		if err == nil {
			err = cfg.Validate()
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: got %v, want %q", tc.yaml, err, tc.want)
		}
	}
}

// TestClusterFlags: a file shared by every node (a Kubernetes ConfigMap)
// leaves the node's name and address to flags.
func TestClusterFlags(t *testing.T) {
	s, err := decodeServer([]byte("cluster:\n  redis: redis://redis:6379/0\n  secret: s\n"), "server.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Validate(); err == nil || !strings.Contains(err.Error(), "cluster.advertise") {
		t.Fatalf("without an advertised URL: %v", err)
	}
	fs := flag.NewFlagSet("server", flag.ContinueOnError)
	s.Flags(fs)
	if err := fs.Parse([]string{"-cluster.node", "wsp-7d9f-x2k4p", "-cluster.advertise", "http://10.1.2.3:8080"}); err != nil {
		t.Fatal(err)
	}
	if s.Cluster.Node != "wsp-7d9f-x2k4p" || s.Cluster.Advertise != "http://10.1.2.3:8080" {
		t.Fatalf("flags not applied: %+v", s.Cluster)
	}
	if err := s.Validate(); err != nil {
		t.Fatal(err)
	}
}

// TestClusterRedisFromEnvironment: the Redis URL, which may hold a
// password, can come from the environment like a secret.
func TestClusterRedisFromEnvironment(t *testing.T) {
	t.Setenv("WSP_TEST_REDIS", "redis://:pw@redis:6379/0")
	s, err := decodeServer([]byte("cluster:\n  redis: env:WSP_TEST_REDIS\n  advertise: http://10.0.0.1:8080\n  secret: s\n"), "server.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Validate(); err != nil {
		t.Fatal(err)
	}
	if s.Cluster.Redis != "redis://:pw@redis:6379/0" {
		t.Fatalf("cluster.redis = %q", s.Cluster.Redis)
	}
	s, _ = decodeServer([]byte("cluster:\n  redis: env:WSP_TEST_UNSET\n  advertise: http://10.0.0.1:8080\n  secret: s\n"), "server.yaml")
	if err := s.Validate(); err == nil || !strings.Contains(err.Error(), "cluster.redis") || !strings.Contains(err.Error(), "WSP_TEST_UNSET") {
		t.Fatalf("unset variable: %v", err)
	}
}
