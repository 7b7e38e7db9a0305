package test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"wsp/internal/client"
	"wsp/internal/config"
)

// Scaling, pattern 1 (docs/scaling.md): a client holds a session to every
// server node, found through DNS or through a load balancer and the
// servers' node count.

// tableResolver answers lookups from a table the test changes as it goes.
type tableResolver struct {
	mu      sync.Mutex
	hosts   map[string][]string // guarded by mu
	err     error               // guarded by mu: when set, every lookup fails with it
	lookups int                 // guarded by mu
}

func (r *tableResolver) LookupHost(ctx context.Context, host string) ([]string, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lookups++
	if r.err != nil {
		return nil, r.err
	}
	addrs, ok := r.hosts[host]
	if !ok {
		return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	}
	return slices.Clone(addrs), nil
}

func (r *tableResolver) set(host string, addrs ...string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.hosts[host] = addrs
}

func (r *tableResolver) fail(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.err = err
}

func (r *tableResolver) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.lookups
}

// startClientResolving runs a client whose host names resolve through res,
// until the test ends; its log goes to the test and to logs. It does not
// wait for a session.
func startClientResolving(t *testing.T, cfg config.Client, res client.Resolver, logs *logBuffer) *agent {
	t.Helper()
	log := slog.New(slog.NewTextHandler(io.MultiWriter(&tWriter{t: t}, logs), &slog.HandlerOptions{Level: slog.LevelDebug})).With("component", "client")
	c, err := client.New(cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	c.Resolver = res
	ctx, cancel := context.WithCancel(context.Background())
	a := &agent{c: c, cancel: cancel, done: make(chan struct{})}
	go func() { defer close(a.done); c.Run(ctx) }()
	t.Cleanup(a.stop)
	return a
}

// clientStats is a client's /api/stats.
type clientStats struct {
	Targets []struct {
		Target    string
		Connected bool
		Addresses []string
		Nodes     int
		Sessions  []struct {
			Address   string
			Extra     bool
			Node      string
			Connected bool
			Draining  bool
		}
	}
}

// apiStats reads the client's /api/stats.
func (a *agent) apiStats(t *testing.T) clientStats {
	t.Helper()
	rec := httptest.NewRecorder()
	a.c.AdminHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/api/stats", nil))
	var v clientStats
	if err := json.Unmarshal(rec.Body.Bytes(), &v); err != nil {
		t.Fatalf("client /api/stats: %v: %s", err, rec.Body)
	}
	return v
}

// heldNodes lists, sorted, the nodes of the client's connected sessions (all
// targets), each as often as it has sessions on it.
func (a *agent) heldNodes(t *testing.T) []string {
	var nodes []string
	for _, tg := range a.apiStats(t).Targets {
		for _, s := range tg.Sessions {
			if s.Connected {
				nodes = append(nodes, s.Node)
			}
		}
	}
	slices.Sort(nodes)
	return nodes
}

// nodeProcess is a `wsp server` process, one node of several.
type nodeProcess struct {
	proc  *wspProcess
	name  string
	addr  string // host:port of its app listener
	admin string // http://host:port of its admin listener
}

var adminListeningLine = regexp.MustCompile(`msg="admin listening" addr=(\S+)`)

// startNodeProcess runs `wsp server` as node name, one of three
// (cluster.nodes), on host:port (port 0 picks one), with an admin listener
// on a free loopback port.
func startNodeProcess(t *testing.T, name, host, port string) *nodeProcess {
	t.Helper()
	yaml := fmt.Sprintf("host: %s\nport: %s\nadmin: 127.0.0.1:0\nkeepalive: 1s\ndrain: 5s\ncluster:\n  node: %s\n  nodes: 3\n", host, port, name)
	p := startWsp(t, "server", yaml)
	n := &nodeProcess{proc: p, name: name, addr: p.listening(t)}
	waitFor(t, name+"'s admin listener", func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		for _, line := range p.log {
			if m := adminListeningLine.FindStringSubmatch(line); m != nil {
				n.admin = m[1]
				return true
			}
		}
		return false
	})
	return n
}

// sessions is how many client sessions the node holds; -1 when its admin
// listener does not answer.
func (n *nodeProcess) sessions() int {
	resp, err := testHTTP.Get(n.admin + "/api/stats")
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	var v struct{ Sessions int }
	if resp.StatusCode != 200 || json.NewDecoder(resp.Body).Decode(&v) != nil {
		return -1
	}
	return v.Sessions
}

// get sends a /request for dest through the server at addr and returns
// the status and body, or the error.
func requestThrough(addr, dest string) (int, string, error) {
	req, err := http.NewRequest("GET", "http://"+addr+"/request", nil)
	if err != nil {
		return 0, "", err
	}
	req.Header.Set("X-Proxy-Destination", dest)
	resp, err := testHTTP.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// mustServeThrough checks that n requests through addr reach the backend.
func mustServeThrough(t *testing.T, addr, dest string, n int) {
	t.Helper()
	for i := range n {
		status, body, err := requestThrough(addr, dest)
		if err != nil || status != 200 || body != "served" {
			t.Fatalf("request %d through %s: %d %q %v", i, addr, status, body, err)
		}
	}
}

func servedBackend(t *testing.T) *httptest.Server {
	return backend(t, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "served") }))
}

// TestDiscoverySessionPerNode: three `wsp server` processes on 127.0.0.1,
// .2 and .3, one port, behind one name: the client holds a session to each,
// and each serves requests. A killed node leaves the others serving; a
// fourth address gets a session at the next lookup; a vanished address
// loses its session; failed lookups keep the sessions and are logged once.
func TestDiscoverySessionPerNode(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	needLoopbackAddrs(t, "127.0.0.2", "127.0.0.3", "127.0.0.4")
	const name = "nodes.wsp.test"
	n1 := startNodeProcess(t, "n1", "127.0.0.1", "0")
	_, port, _ := net.SplitHostPort(n1.addr)
	n2 := startNodeProcess(t, "n2", "127.0.0.2", port)
	n3 := startNodeProcess(t, "n3", "127.0.0.3", port)
	res := &tableResolver{hosts: map[string][]string{name: {"127.0.0.3", "127.0.0.1", "127.0.0.2"}}}
	slowStarted, slowRelease := make(chan struct{}), make(chan struct{})
	b := backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			close(slowStarted)
			<-slowRelease
		}
		io.WriteString(w, "served")
	}))
	release := sync.OnceFunc(func() { close(slowRelease) })
	t.Cleanup(release) // before the backend's Close, which waits for its handlers

	cfg := clientConfig(&relay{addr: net.JoinHostPort(name, port)}, "pool")
	cfg.Discovery = config.Duration(time.Second) // the shortest allowed
	cfg.KeepAlive = config.Duration(time.Second)
	logs := &logBuffer{}
	a := startClientResolving(t, cfg, res, logs)

	sessionsAre := func(want map[*nodeProcess]int) func() bool {
		return func() bool {
			for n, w := range want {
				if n.sessions() != w {
					return false
				}
			}
			return true
		}
	}
	waitFor(t, "a session on each of the three nodes", sessionsAre(map[*nodeProcess]int{n1: 1, n2: 1, n3: 1}))
	waitFor(t, "the client to see the three nodes", func() bool { return slices.Equal(a.heldNodes(t), []string{"n1", "n2", "n3"}) })
	st := a.apiStats(t).Targets[0]
	if want := []string{"127.0.0.1", "127.0.0.2", "127.0.0.3"}; !slices.Equal(st.Addresses, want) || len(st.Sessions) != 3 {
		t.Fatalf("client stats: addresses %q, %d sessions; want %q and 3", st.Addresses, len(st.Sessions), want)
	}
	for _, n := range []*nodeProcess{n1, n2, n3} {
		mustServeThrough(t, n.addr, b.URL, 5)
	}

	// Kill a node: the others go on serving.
	n2.proc.cmd.Process.Signal(os.Kill)
	if code := n2.proc.wait(10 * time.Second); code == 0 {
		t.Fatal("n2 did not die")
	}
	waitFor(t, "the client to notice n2 is gone", func() bool { return slices.Equal(a.heldNodes(t), []string{"n1", "n3"}) })
	for _, n := range []*nodeProcess{n1, n3} {
		mustServeThrough(t, n.addr, b.URL, 20)
	}

	// A fourth address appears: a session to it follows the next lookup.
	n4 := startNodeProcess(t, "n4", "127.0.0.4", port)
	res.set(name, "127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4")
	waitFor(t, "a session on the new node", sessionsAre(map[*nodeProcess]int{n4: 1}))
	mustServeThrough(t, n4.addr, b.URL, 5)

	// An address vanishes with a request in flight through it: its session
	// drains (the request finishes), then closes; the others stay.
	slow := make(chan string, 1)
	go func() {
		status, body, err := requestThrough(n3.addr, b.URL+"/slow")
		slow <- fmt.Sprint(status, " ", body, " ", err)
	}()
	select {
	case <-slowStarted:
	case got := <-slow:
		t.Fatalf("slow request through n3: %s", got)
	case <-time.After(10 * time.Second):
		t.Fatal("the slow request never reached the backend")
	}
	res.set(name, "127.0.0.1", "127.0.0.2", "127.0.0.4")
	waitFor(t, "n3's session to drain", func() bool {
		for _, s := range a.apiStats(t).Targets[0].Sessions {
			if s.Node == "n3" && s.Draining {
				return true
			}
		}
		return false
	})
	release()
	if got := <-slow; got != "200 served <nil>" {
		t.Fatalf("request in flight while its address vanished: %s", got)
	}
	waitFor(t, "n3's session closed", sessionsAre(map[*nodeProcess]int{n3: 0, n1: 1, n4: 1}))
	waitFor(t, "the client to hold n1 and n4", func() bool { return slices.Equal(a.heldNodes(t), []string{"n1", "n4"}) })
	mustServeThrough(t, n1.addr, b.URL, 5)
	if status, _, err := requestThrough(n3.addr, b.URL); err != nil || status != http.StatusServiceUnavailable {
		t.Fatalf("through n3, which the client left: %d %v; want 503", status, err)
	}

	// Lookups fail: the sessions stay, and the failure is logged once.
	res.fail(&net.DNSError{Err: "server misbehaving", Name: name, IsTemporary: true})
	failedFrom := res.count()
	waitFor(t, "three failed lookups", func() bool { return res.count() >= failedFrom+3 })
	if n := logs.count("cannot resolve target"); n != 1 {
		t.Errorf("a failing lookup was logged %d times over three lookups, want once", n)
	}
	if !slices.Equal(a.heldNodes(t), []string{"n1", "n4"}) || n1.sessions() != 1 || n4.sessions() != 1 {
		t.Fatalf("sessions after failed lookups: client %q, n1 %d, n4 %d", a.heldNodes(t), n1.sessions(), n4.sessions())
	}
	mustServeThrough(t, n4.addr, b.URL, 5)
	for _, s := range a.apiStats(t).Targets[0].Sessions {
		if s.Extra {
			t.Errorf("an extra session with an address per node: %+v", s)
		}
	}
}

// needLoopbackAddrs skips the test, or fails it in CI (CI set), when the
// addresses cannot be listened on. Linux routes all of 127.0.0.0/8 to the
// loopback interface; macOS has only 127.0.0.1 unless given aliases.
func needLoopbackAddrs(t *testing.T, addrs ...string) {
	t.Helper()
	for _, a := range addrs {
		ln, err := net.Listen("tcp", net.JoinHostPort(a, "0"))
		if err != nil {
			msg := fmt.Sprintf("this test runs server nodes on %s and cannot listen on %s: %v "+
				"(Linux can; on macOS: sudo ifconfig lo0 alias %s up)", strings.Join(addrs, ", "), a, err, a)
			if os.Getenv("CI") != "" {
				t.Fatal(msg)
			}
			t.Skip(msg)
		}
		ln.Close()
	}
}

// metricValue reads the value of an unlabelled metric from a /metrics
// page; -1 when it is not there.
func metricValue(page, name string) float64 {
	for _, line := range strings.Split(page, "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			var f float64
			if _, err := fmt.Sscan(v, &f); err == nil {
				return f
			}
		}
	}
	return -1
}

// tcpBalancer is a minimal TCP load balancer on loopback: each connection
// goes to backends[pick(i)] for the i-th connection accepted, and is piped
// both ways. It holds at most maxBalancerConns connections at once and
// closes them all, and waits for its goroutines, when the test ends.
type tcpBalancer struct {
	ln       net.Listener
	backends []string
	pick     func(i int) int
	accepted atomic.Int64
	wg       sync.WaitGroup

	mu    sync.Mutex
	conns map[net.Conn]struct{} // guarded by mu: both ends of every pipe
}

const maxBalancerConns = 64

func startTCPBalancer(t *testing.T, pick func(i int) int, backends ...string) *tcpBalancer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	lb := &tcpBalancer{ln: ln, backends: backends, pick: pick, conns: map[net.Conn]struct{}{}}
	lb.wg.Go(lb.serve)
	t.Cleanup(lb.close)
	return lb
}

func (lb *tcpBalancer) addr() string { return lb.ln.Addr().String() }

func (lb *tcpBalancer) serve() {
	slots := make(chan struct{}, maxBalancerConns)
	for {
		in, err := lb.ln.Accept()
		if err != nil {
			return
		}
		i := int(lb.accepted.Add(1)) - 1
		select {
		case slots <- struct{}{}:
		default:
			in.Close() // over the bound
			continue
		}
		lb.wg.Go(func() {
			defer func() { <-slots }()
			lb.pipe(in, lb.backends[lb.pick(i)%len(lb.backends)])
		})
	}
}

// pipe joins in to a new connection to backend until either side ends.
func (lb *tcpBalancer) pipe(in net.Conn, backend string) {
	defer in.Close()
	out, err := net.DialTimeout("tcp", backend, 5*time.Second)
	if err != nil {
		return
	}
	defer out.Close()
	if !lb.track(in, out) {
		return
	}
	defer lb.untrack(in, out)
	done := make(chan struct{}, 2)
	go func() { io.Copy(out, in); done <- struct{}{} }()
	go func() { io.Copy(in, out); done <- struct{}{} }()
	<-done
	in.Close()
	out.Close()
	<-done
}

func (lb *tcpBalancer) track(cs ...net.Conn) bool {
	lb.mu.Lock()
	defer lb.mu.Unlock()
	if lb.conns == nil {
		return false // closed
	}
	for _, c := range cs {
		lb.conns[c] = struct{}{}
	}
	return true
}

func (lb *tcpBalancer) untrack(cs ...net.Conn) {
	lb.mu.Lock()
	defer lb.mu.Unlock()
	for _, c := range cs {
		delete(lb.conns, c)
	}
}

// close stops accepting, ends every pipe and waits for them.
func (lb *tcpBalancer) close() {
	lb.ln.Close()
	lb.mu.Lock()
	for c := range lb.conns {
		c.Close()
	}
	lb.conns = nil
	lb.mu.Unlock()
	lb.wg.Wait()
}

// TestNodeCountThroughLoadBalancer: three nodes started with cluster.nodes 3
// behind one load balancer address, which sends two connections in a row to
// the same node: the client opens more sessions through the balancer,
// closes those that land on a node it already holds, and ends with one
// session on each node, three in all.
func TestNodeCountThroughLoadBalancer(t *testing.T) {
	var nodes []*relay
	var addrs []string
	for i := range 3 {
		cfg := serverConfig()
		cfg.Cluster.Nodes = 3
		cfg.Cluster.Node = fmt.Sprintf("lb-n%d", i+1)
		r := startServer(t, cfg, nil)
		nodes = append(nodes, r)
		addrs = append(addrs, r.addr)
	}
	lb := startTCPBalancer(t, func(i int) int { return i / 2 }, addrs...)
	b := servedBackend(t)

	cfg := clientConfig(&relay{addr: lb.addr()}, "pool")
	logs := &logBuffer{}
	a := startClientResolving(t, cfg, nil, logs)
	waitFor(t, "one session on each node", func() bool {
		return nodes[0].sessions() == 1 && nodes[1].sessions() == 1 && nodes[2].sessions() == 1
	})
	waitFor(t, "the client to see the three nodes", func() bool {
		return slices.Equal(a.heldNodes(t), []string{"lb-n1", "lb-n2", "lb-n3"})
	})
	st := a.apiStats(t).Targets[0]
	if st.Nodes != 3 || len(st.Sessions) != 3 {
		t.Fatalf("client stats: nodes %d, %d sessions; want 3 and 3: %+v", st.Nodes, len(st.Sessions), st)
	}
	if n := lb.accepted.Load(); n <= 3 {
		t.Fatalf("the balancer saw %d connections: no session landed twice on a node, the test proves nothing", n)
	}
	if logs.count("landed on a node this target already holds") == 0 {
		t.Error("no duplicate session was logged")
	}
	rec := httptest.NewRecorder()
	a.c.AdminHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if v := metricValue(rec.Body.String(), "wsp_client_sessions"); v != 3 {
		t.Errorf("client wsp_client_sessions = %v, want 3", v)
	}
	if v := metricValue(rec.Body.String(), "wsp_client_duplicate_node_sessions_total"); v < 1 {
		t.Errorf("client wsp_client_duplicate_node_sessions_total = %v, want at least 1", v)
	}
	for _, r := range nodes {
		mustServeThrough(t, r.addr, b.URL, 5)
	}
	if total := nodes[0].sessions() + nodes[1].sessions() + nodes[2].sessions(); total != 3 {
		t.Fatalf("%d sessions over the three nodes, want 3", total)
	}
}
