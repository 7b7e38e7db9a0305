package client

import (
	"context"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"wsp/internal/config"
	"wsp/internal/tunnel"
)

// fakeRegister answers /register as a wsp server's handshake does, naming
// itself node, and records the Host each upgrade asked for.
type fakeRegister struct {
	node, nodes string
	mu          sync.Mutex
	hosts       []string // guarded by mu
}

func (f *fakeRegister) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	f.hosts = append(f.hosts, r.Host)
	f.mu.Unlock()
	up := websocket.Upgrader{Subprotocols: []string{tunnel.Subprotocol}}
	h := http.Header{tunnel.HeaderSession: {"0123456789abcdef"}, tunnel.HeaderNode: {f.node}}
	if f.nodes != "" {
		h.Set(tunnel.HeaderNodes, f.nodes)
	}
	ws, err := up.Upgrade(w, r, h)
	if err != nil {
		return
	}
	ws.Close()
}

func (f *fakeRegister) lastHost() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.hosts) == 0 {
		return ""
	}
	return f.hosts[len(f.hosts)-1]
}

func newTestClient(t *testing.T) *Client {
	t.Helper()
	cfg := config.DefaultClient()
	cfg.ID = "c1"
	cfg.AllowAny = true
	c, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.backends.close)
	return c
}

// A handshake through an address dials that address, and keeps the
// target's name for TLS verification and the Host header.
func TestHandshakeThroughAddress(t *testing.T) {
	f := &fakeRegister{node: "node-a", nodes: "3"}
	srv := httptest.NewTLSServer(f) // its certificate names example.com and 127.0.0.1
	defer srv.Close()
	_, port, _ := net.SplitHostPort(srv.Listener.Addr().String())
	c := newTestClient(t)
	c.dialer.TLSClientConfig.RootCAs = srv.Client().Transport.(*http.Transport).TLSClientConfig.RootCAs
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	target := "wss://example.com:" + port + "/register"
	ws, ans, err := c.handshake(ctx, target, "127.0.0.1")
	if err != nil {
		t.Fatalf("handshake to %s through 127.0.0.1: %v", target, err)
	}
	ws.Close()
	if want := (answer{session: "0123456789abcdef", node: "node-a", nodes: 3}); ans != want {
		t.Errorf("answer = %+v, want %+v", ans, want)
	}
	if got := f.lastHost(); got != "example.com:"+port {
		t.Errorf("the server saw Host %q, want the target's name", got)
	}

	// The certificate is checked against the name, not the address (which
	// the certificate also names).
	_, _, err = c.handshake(ctx, "wss://other.test:"+port+"/register", "127.0.0.1")
	if err == nil || !isCertError(err) {
		t.Fatalf("handshake to a name the certificate does not hold: %v, want a certificate error", err)
	}
}

func TestHandshakeThroughAddressPlain(t *testing.T) {
	f := &fakeRegister{node: "node-b"}
	srv := httptest.NewServer(f)
	defer srv.Close()
	_, port, _ := net.SplitHostPort(srv.Listener.Addr().String())
	c := newTestClient(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ws, ans, err := c.handshake(ctx, "http://nodes.wsp.test:"+port+"/register", "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	ws.Close()
	if ans.node != "node-b" || ans.nodes != 0 {
		t.Errorf("answer = %+v", ans)
	}
	if got := f.lastHost(); got != "nodes.wsp.test:"+port {
		t.Errorf("Host = %q", got)
	}
}

func TestThroughAddr(t *testing.T) {
	var proxied []string
	d := tunnel.NewDialer(time.Second)
	d.Proxy = func(r *http.Request) (*url.URL, error) {
		proxied = append(proxied, r.URL.Host)
		return nil, nil
	}
	tests := []struct{ raw, addr, want, host string }{
		{"ws://nodes.wsp.test:8080/register", "10.0.0.1", "ws://10.0.0.1:8080/register", "nodes.wsp.test:8080"},
		{"ws://nodes.wsp.test/register", "10.0.0.1", "ws://10.0.0.1:80/register", "nodes.wsp.test"},
		{"wss://nodes.wsp.test/register?x=1", "2001:db8::1", "wss://[2001:db8::1]:443/register?x=1", "nodes.wsp.test"},
	}
	for _, tt := range tests {
		dd := *d
		dd.TLSClientConfig = nil
		h := http.Header{}
		got, err := throughAddr(&dd, h, tt.raw, tt.addr)
		if err != nil || got != tt.want {
			t.Errorf("throughAddr(%s, %s) = %q, %v; want %q", tt.raw, tt.addr, got, err, tt.want)
		}
		if h.Get("Host") != tt.host {
			t.Errorf("Host header %q, want %q", h.Get("Host"), tt.host)
		}
		if strings.HasPrefix(tt.raw, "wss:") && (dd.TLSClientConfig == nil || dd.TLSClientConfig.ServerName != "nodes.wsp.test") {
			t.Errorf("%s: TLS server name not the target's name: %+v", tt.raw, dd.TLSClientConfig)
		}
		// The proxy is chosen for the name (NO_PROXY lists names).
		r := &http.Request{URL: mustURL(t, "http://"+strings.TrimPrefix(strings.TrimPrefix(got, "wss://"), "ws://"))}
		dd.Proxy(r)
		if last := proxied[len(proxied)-1]; last != tt.host {
			t.Errorf("proxy asked about %q, want %q", last, tt.host)
		}
	}
}

func mustURL(t *testing.T, raw string) *url.URL {
	t.Helper()
	u, err := url.Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	return u
}
