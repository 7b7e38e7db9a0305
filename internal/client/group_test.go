package client

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"wsp/internal/config"
	"wsp/internal/tunnel"
)

// A targetGroup's run loop against fake server nodes and a fake resolver:
// what discovery and the node count do over time, apart from the rest of
// the client.

// fakeCluster is server nodes behind one address, as a round robin load
// balancer shows them: each upgrade goes to the next live node in turn,
// which answers in its name with the node count, and keeps the session up
// until the node goes or the test ends.
type fakeCluster struct {
	t   *testing.T
	srv *httptest.Server

	mu         sync.Mutex
	count      int                        // guarded by mu: X-Wsp-Nodes of new answers; 0 = none
	names      []string                   // guarded by mu: the live nodes
	turn       int                        // guarded by mu
	handshakes int                        // guarded by mu
	sessions   map[*tunnel.Session]string // guarded by mu: each session's node
	// onSession, when set, runs in the handler with each new session,
	// the n-th handshake; when it returns true, the client has received
	// nothing yet: the 101 and all written after it reach it then, at once.
	onSession func(n int, node string, sess *tunnel.Session) (held bool)
}

func newFakeCluster(t *testing.T, count int, names ...string) *fakeCluster {
	t.Helper()
	f := &fakeCluster{t: t, count: count, names: names, sessions: map[*tunnel.Session]string{}}
	f.srv = httptest.NewServer(f)
	t.Cleanup(f.close)
	return f
}

func (f *fakeCluster) port() string {
	_, port, _ := net.SplitHostPort(f.srv.Listener.Addr().String())
	return port
}

func (f *fakeCluster) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	if len(f.names) == 0 {
		f.mu.Unlock()
		http.Error(w, "no node", http.StatusServiceUnavailable)
		return
	}
	node := f.names[f.turn%len(f.names)]
	f.turn++
	f.handshakes++
	n := f.handshakes
	h := http.Header{tunnel.HeaderSession: {fmt.Sprintf("%016x", n)}, tunnel.HeaderNode: {node}}
	if f.count > 0 {
		h.Set(tunnel.HeaderNodes, fmt.Sprint(f.count))
	}
	onSession := f.onSession
	f.mu.Unlock()
	hw := &holdingWriter{ResponseWriter: w}
	up := websocket.Upgrader{Subprotocols: []string{tunnel.Subprotocol}}
	ws, err := up.Upgrade(hw, r, h)
	if err != nil {
		return
	}
	defer hw.conn.release()
	sess, err := tunnel.NewServerSession(ws, tunnel.DefaultConfig())
	if err != nil {
		return
	}
	f.mu.Lock()
	f.sessions[sess] = node
	f.mu.Unlock()
	if onSession == nil || !onSession(n, node, sess) {
		hw.conn.release()
	}
}

// holdingWriter hijacks to a heldConn.
type holdingWriter struct {
	http.ResponseWriter
	conn *heldConn
}

func (w *holdingWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	c, brw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	w.conn = &heldConn{Conn: c, holding: true}
	return w.conn, brw, nil
}

// heldConn keeps what is written to it until release, then sends it in
// one piece.
type heldConn struct {
	net.Conn
	mu      sync.Mutex
	holding bool   // guarded by mu
	held    []byte // guarded by mu
}

func (c *heldConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	if c.holding {
		c.held = append(c.held, p...)
		c.mu.Unlock()
		return len(p), nil
	}
	c.mu.Unlock()
	return c.Conn.Write(p)
}

// release sends what was held, and lets writes through from now on.
func (c *heldConn) release() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.holding {
		c.holding = false
		c.Conn.Write(c.held)
	}
}

// open lists the nodes of the sessions still up, sorted.
func (f *fakeCluster) open() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var nodes []string
	for sess, node := range f.sessions {
		if !sess.IsClosed() {
			nodes = append(nodes, node)
		}
	}
	slices.Sort(nodes)
	return nodes
}

func (f *fakeCluster) handshakeCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.handshakes
}

// setCount changes the node count of the answers from now on.
func (f *fakeCluster) setCount(n int) {
	f.mu.Lock()
	f.count = n
	f.mu.Unlock()
}

// replace takes node old away, closing its sessions, and puts node new
// (unless "") in its place: a node restarting under another name.
func (f *fakeCluster) replace(old, new string) {
	f.mu.Lock()
	i := slices.Index(f.names, old)
	if new == "" {
		f.names = slices.Delete(f.names, i, i+1)
	} else {
		f.names[i] = new
	}
	var closing []*tunnel.Session
	for sess, node := range f.sessions {
		if node == old {
			closing = append(closing, sess)
		}
	}
	f.mu.Unlock()
	for _, sess := range closing {
		sess.Close()
	}
}

func (f *fakeCluster) close() {
	f.mu.Lock()
	sessions := f.sessions
	f.sessions = map[*tunnel.Session]string{}
	f.mu.Unlock()
	for sess := range sessions {
		sess.Close()
	}
	f.srv.Close()
}

// fakeResolver answers every name with its current addresses.
type fakeResolver struct {
	mu      sync.Mutex
	addrs   []string // guarded by mu
	lookups int      // guarded by mu
}

func (r *fakeResolver) LookupHost(ctx context.Context, host string) ([]string, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lookups++
	return slices.Clone(r.addrs), nil
}

func (r *fakeResolver) set(addrs ...string) {
	r.mu.Lock()
	r.addrs = addrs
	r.mu.Unlock()
}

func (r *fakeResolver) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.lookups
}

// logRecorder is a slog.Handler that keeps each record's level, message
// and attributes as one line.
type logRecorder struct {
	mu    sync.Mutex
	lines []string // guarded by mu
}

func (l *logRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (l *logRecorder) WithAttrs([]slog.Attr) slog.Handler       { return l }
func (l *logRecorder) WithGroup(string) slog.Handler            { return l }

func (l *logRecorder) Handle(_ context.Context, r slog.Record) error {
	line := r.Level.String() + " " + r.Message
	r.Attrs(func(a slog.Attr) bool {
		line += " " + a.String()
		return true
	})
	l.mu.Lock()
	l.lines = append(l.lines, line)
	l.mu.Unlock()
	return nil
}

// count counts the lines at level whose text contains substr.
func (l *logRecorder) count(level slog.Level, substr string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, line := range l.lines {
		if strings.HasPrefix(line, level.String()+" ") && strings.Contains(line, substr) {
			n++
		}
	}
	return n
}

// testGroup runs a target group of a fresh client on target until the
// test ends (or stop), with discovery every 20 ms, a 1 ms back-off and a
// pause of an hour after a round of sessions on held nodes, unless tune
// (when not nil) changes them.
type testGroup struct {
	*targetGroup
	logs *logRecorder
	stop func()
}

func startGroup(t *testing.T, target string, res Resolver, tune func(*targetGroup)) *testGroup {
	t.Helper()
	cfg := config.DefaultClient()
	cfg.ID = "c1"
	cfg.AllowAny = true
	cfg.Targets = []string{target}
	logs := &logRecorder{}
	c, err := New(cfg, slog.New(logs))
	if err != nil {
		t.Fatal(err)
	}
	c.Resolver = res
	g, err := newTargetGroup(c, target)
	if err != nil {
		t.Fatal(err)
	}
	g.interval = 20 * time.Millisecond
	g.heldWait = time.Hour
	g.backoff = func(int) time.Duration { return time.Millisecond }
	if tune != nil {
		tune(g)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		g.run(ctx)
	}()
	stop := sync.OnceFunc(func() {
		cancel()
		<-done
		c.backends.close()
	})
	t.Cleanup(stop)
	return &testGroup{targetGroup: g, logs: logs, stop: stop}
}

// state is the target as /api/stats shows it.
func (g *testGroup) state() targetState {
	g.c.mu.Lock()
	defer g.c.mu.Unlock()
	return g.c.targets[g.target]
}

// held lists the nodes of the connected sessions, sorted.
func (g *testGroup) held() []string {
	var nodes []string
	for _, s := range g.state().Sessions {
		if s.Connected {
			nodes = append(nodes, s.Node)
		}
	}
	slices.Sort(nodes)
	return nodes
}

// waitUntil polls cond until it holds or 10 s pass.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// The run loop through a lookup without addresses, a node that restarts
// under a new name and a node count that shrinks.
func TestTargetGroupRun(t *testing.T) {
	fc := newFakeCluster(t, 3, "a", "b", "c")
	res := &fakeResolver{} // no address yet
	g := startGroup(t, "ws://nodes.wsp.test:"+fc.port()+"/register", res, nil)

	// No address: nothing is dialed, the state says why, lookups go on.
	waitUntil(t, "lookups without an address", func() bool {
		return res.count() >= 3 && strings.Contains(g.state().ResolveError, "no IP address")
	})
	if n := fc.handshakeCount(); n != 0 || len(g.state().Sessions) != 0 {
		t.Fatalf("%d handshakes, %d sessions without an address", n, len(g.state().Sessions))
	}

	// One address, a balancer in front of three nodes: one session to each.
	res.set("127.0.0.1")
	abc := []string{"a", "b", "c"}
	waitUntil(t, "a session on each node", func() bool {
		return slices.Equal(g.held(), abc) && slices.Equal(fc.open(), abc)
	})
	if st := g.state(); st.Nodes != 3 || st.ResolveError != "" || !slices.Equal(st.Addresses, []string{"127.0.0.1"}) {
		t.Fatalf("state: %+v", st)
	}

	// The name resolves to nothing for a while: the sessions stay.
	res.set()
	from := res.count()
	waitUntil(t, "lookups without an address", func() bool { return res.count() >= from+3 })
	if st := g.state(); !slices.Equal(g.held(), abc) || !strings.Contains(st.ResolveError, "no IP address") || !slices.Equal(st.Addresses, []string{"127.0.0.1"}) {
		t.Fatalf("after empty answers: held %q, state %+v", g.held(), st)
	}
	res.set("127.0.0.1")
	waitUntil(t, "the name to resolve again", func() bool { return g.state().ResolveError == "" })

	// Node b restarts as b2: its session moves there, nothing else stays.
	fc.replace("b", "b2")
	ab2c := []string{"a", "b2", "c"}
	waitUntil(t, "the sessions to hold a, b2 and c", func() bool {
		return slices.Equal(g.held(), ab2c) && slices.Equal(fc.open(), ab2c) && len(g.state().Sessions) == 3
	})

	// The cluster shrinks to two nodes, which say so: one extra goes.
	fc.setCount(2)
	fc.replace("c", "")
	waitUntil(t, "two sessions for two nodes", func() bool {
		st := g.state()
		return st.Nodes == 2 && len(st.Sessions) == 2 && slices.Equal(g.held(), []string{"a", "b2"}) &&
			slices.Equal(fc.open(), []string{"a", "b2"})
	})
	g.stop()
	if st := g.state(); st.Connected || len(st.Sessions) != 0 {
		t.Fatalf("after the group stopped: %+v", st)
	}
}

// A session the client does not keep may carry a request the server sent
// at once: it is served, and the session closes saying why.
func TestDismissedSessionServesItsRequest(t *testing.T) {
	b := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "served") }))
	defer b.Close()
	fc := newFakeCluster(t, 2, "a") // two nodes said, one there: the extra lands on a
	type outcome struct {
		answer string
		ended  error
	}
	got := make(chan outcome, 1)
	var exchanges sync.WaitGroup
	t.Cleanup(exchanges.Wait)
	fc.onSession = func(n int, _ string, sess *tunnel.Session) bool {
		if n != 2 {
			return false
		}
		// The server puts a request on the session as soon as it has
		// registered it, before the client has even read the 101.
		req, _ := http.NewRequest("GET", b.URL, nil)
		st, err := sess.OpenStream()
		if err == nil {
			st.SetDeadline(time.Now().Add(10 * time.Second))
			err = req.WriteProxy(st)
		}
		exchanges.Go(func() {
			var o outcome
			if err == nil {
				var resp *http.Response
				if resp, err = http.ReadResponse(bufio.NewReader(st), req); err == nil {
					body, _ := io.ReadAll(resp.Body)
					o.answer = fmt.Sprint(resp.StatusCode, " ", string(body))
				}
				st.Close()
			}
			if err != nil {
				o.answer = err.Error()
			}
			select {
			case <-sess.CloseChan():
				o.ended = sess.Err()
			case <-time.After(10 * time.Second):
			}
			got <- o
		})
		return true
	}
	g := startGroup(t, "ws://127.0.0.1:"+fc.port()+"/register", nil, nil)
	var o outcome
	select {
	case o = <-got:
	case <-time.After(20 * time.Second):
		t.Fatal("no outcome for the request on the dismissed session")
	}
	if o.answer != "200 served" {
		t.Errorf("request on the dismissed session: %s, want 200 served", o.answer)
	}
	var ce *websocket.CloseError
	if !errors.As(o.ended, &ce) || !strings.Contains(ce.Text, "already holds a session to this node") {
		t.Errorf("the dismissed session ended with %v, want a close saying why", o.ended)
	}
	waitUntil(t, "the first session's connected line", func() bool { return g.logs.count(slog.LevelInfo, "INFO connected") > 0 })
	if n := g.logs.count(slog.LevelInfo, "INFO connected"); n != 1 {
		t.Errorf("%d connected lines, want 1: a dismissed session is not one", n)
	}
}

// With a node count the live nodes cannot reach, one extra looks for the
// missing node: a round of attempts, each landing on a held node, then a
// pause, logged once.
func TestUnreachableNodeCount(t *testing.T) {
	fc := newFakeCluster(t, 4, "a", "b") // four nodes said, two there
	g := startGroup(t, "ws://127.0.0.1:"+fc.port()+"/register", nil, nil)
	waitUntil(t, "a and b held, an extra pausing", func() bool {
		if !slices.Equal(g.held(), []string{"a", "b"}) {
			return false
		}
		for _, s := range g.state().Sessions {
			if strings.Contains(s.LastError, "trying again in 1h0m0s") {
				return true
			}
		}
		return false
	})
	// a, b, then a round of four (max of the addresses and the count).
	if n := fc.handshakeCount(); n != 2+4 {
		t.Errorf("%d handshakes, want 6", n)
	}
	if n := len(g.state().Sessions); n != 3 {
		t.Errorf("%d sessions kept or looking, want 3: one extra looks, not one per missing node", n)
	}
	if info, debug := g.logs.count(slog.LevelInfo, causeDuplicate), g.logs.count(slog.LevelDebug, causeDuplicate); info != 1 || debug != 3 {
		t.Errorf("sessions on held nodes logged %d times at info and %d at debug, want 1 and 3", info, debug)
	}
	// The pause holds: no handshake while it lasts (a bounded look, as
	// this waits for something not to happen).
	time.Sleep(100 * time.Millisecond)
	if n := fc.handshakeCount(); n != 6 {
		t.Errorf("%d handshakes during the pause, want 6", n)
	}
	if got := fc.open(); !slices.Equal(got, []string{"a", "b"}) {
		t.Errorf("sessions open on the servers: %q", got)
	}
}

// Two addresses of one node (IPv4 and IPv6, say), no node count: the
// second address's session is not kept, and that address is tried again
// at the discovery interval.
func TestAddressOfHeldNode(t *testing.T) {
	fc := newFakeCluster(t, 0, "a")
	second, err := net.Listen("tcp", "127.0.0.2:"+fc.port())
	if err != nil {
		t.Skipf("cannot listen on 127.0.0.2 (Linux routes all of 127/8 to lo): %v", err)
	}
	srv2 := &http.Server{Handler: fc}
	served := make(chan struct{})
	go func() {
		defer close(served)
		srv2.Serve(second)
	}()
	defer func() {
		srv2.Close()
		<-served
	}()
	res := &fakeResolver{}
	res.set("127.0.0.1", "127.0.0.2")
	g := startGroup(t, "ws://node.wsp.test:"+fc.port()+"/register", res, func(g *targetGroup) { g.interval = time.Hour })
	waitUntil(t, "one session, the other address waiting", func() bool {
		if !slices.Equal(g.held(), []string{"a"}) {
			return false
		}
		for _, s := range g.state().Sessions {
			if !s.Connected && strings.Contains(s.LastError, "trying again in") {
				return true
			}
		}
		return false
	})
	waitUntil(t, "one session open on the node", func() bool { return slices.Equal(fc.open(), []string{"a"}) })
	if n := fc.handshakeCount(); n != 2 {
		t.Errorf("%d handshakes, want 2: the second address waits for the next discovery round", n)
	}
	if n := g.logs.count(slog.LevelInfo, causeDuplicate); n != 1 {
		t.Errorf("logged %d times at info, want once", n)
	}

	// The first address stops working and the node drops its session: the
	// waiting address takes over at once, not a discovery interval (an
	// hour here) later.
	fc.srv.Listener.Close()
	fc.replace("a", "a")
	waitUntil(t, "the second address to hold the node", func() bool {
		for _, s := range g.state().Sessions {
			if s.Connected && s.Address == "127.0.0.2" {
				return true
			}
		}
		return false
	})
}

// One cause met by several slots, through several addresses, is logged
// once as a warning, then at debug: here two addresses of three refuse
// connections while the first is up.
func TestCauseLoggedOncePerTarget(t *testing.T) {
	fc := newFakeCluster(t, 0, "a")
	for _, ip := range []string{"127.0.0.2", "127.0.0.3"} {
		c, err := net.DialTimeout("tcp", net.JoinHostPort(ip, fc.port()), time.Second)
		if err == nil {
			c.Close()
			t.Skipf("something listens on %s:%s", ip, fc.port())
		}
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Skipf("%s does not refuse connections here (Linux routes all of 127/8 to lo): %v", ip, err)
		}
	}
	res := &fakeResolver{}
	res.set("127.0.0.1")
	g := startGroup(t, "ws://nodes.wsp.test:"+fc.port()+"/register", res, func(g *targetGroup) {
		g.backoff = func(int) time.Duration { return 5 * time.Millisecond }
	})
	// Up first, so that no success comes between the failures: each
	// success makes the causes met after it news again.
	waitUntil(t, "a session", func() bool { return slices.Equal(g.held(), []string{"a"}) })
	res.set("127.0.0.1", "127.0.0.2", "127.0.0.3")
	const msg = "cannot connect through this address while other sessions of the target are up"
	waitUntil(t, "several refusals through each address", func() bool {
		return slices.Equal(g.held(), []string{"a"}) && g.logs.count(slog.LevelDebug, msg) >= 10
	})
	if n := g.logs.count(slog.LevelWarn, "cannot connect"); n != 1 {
		t.Errorf("%d warnings for one cause through two addresses, want 1", n)
	}
}
