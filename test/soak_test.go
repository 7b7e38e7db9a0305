package test

// The soak (issue 6): mixed traffic through a server and two clients of one
// pool, one of them behind a fault proxy that injects random faults, for a
// while; at the end a report of requests, errors by cause, and the trend of
// goroutines, file descriptors and memory. `make soak` runs it for
// 2 minutes (SOAK=30m for longer); `make test` runs a 10 s version.

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"

	"wsp/internal/config"
	"wsp/internal/faultproxy"
)

var soakFor = flag.Duration("soak", 0, "run TestSoak this long (make soak); 0 runs a 10 s version, skipped with -short")

const (
	soakWorkers   = 8
	soakKeepAlive = 500 * time.Millisecond
	// soakOpTimeout bounds one operation: beyond it the operation hung,
	// which the soak reports as a failure (wsp must fail fast).
	soakOpTimeout = 30 * time.Second
)

func TestSoak(t *testing.T) {
	d := *soakFor
	if d <= 0 {
		if testing.Short() {
			t.Skip("soak; make soak runs it for longer")
		}
		d = 10 * time.Second
	}
	leakCheck(t)
	logs := &logCounter{t: t, counts: map[string]int{}}

	scfg := serverConfig()
	scfg.KeepAlive = config.Duration(soakKeepAlive)
	scfg.Drain = config.Duration(5 * time.Second)
	r := startServerWith(t, scfg, nil, logs.logger("server"))
	fp := newFaultProxy(t, r.addr)
	ccfg := clientConfig(r, "pool")
	ccfg.KeepAlive = config.Duration(soakKeepAlive)
	// Cancelled downloads can leave a client handler blocked until the
	// server's stream close timeout (TestFaultCancelledDownloadReleasesClient):
	// do not let the final drain wait long for them.
	ccfg.Drain = config.Duration(time.Second)
	startClientWith(t, viaProxy(ccfg, fp), logs.logger("client-faulty"))
	startClientWith(t, ccfg, logs.logger("client-direct"))
	waitFor(t, "both clients", func() bool { return r.sessions() == 2 })

	env := newSoakEnv(t, r)
	stats := newSoakStats()
	idle := sampleNow(0)

	ctx, stop := context.WithTimeout(context.Background(), d)
	defer stop()
	var wg sync.WaitGroup
	for w := range soakWorkers {
		wg.Go(func() { env.work(ctx, w, stats) })
	}
	faults := map[string]int{}
	wg.Go(func() { injectFaults(ctx, fp, faults) })
	var samples []sample
	wg.Go(func() { samples = sampleEvery(ctx, soakSampleInterval(d)) })
	wg.Wait()

	// Quiesce: the network is back, everything in flight has ended.
	fp.Set(faultproxy.Pass)
	var unsettled []string
	for _, c := range []struct {
		what  string
		limit time.Duration
		cond  func() bool
	}{
		// The faulty client may be in a back-off of up to 30 s.
		{"both clients connected", 45 * time.Second, func() bool { return r.sessions() == 2 }},
		{"nothing in flight", 10 * time.Second, func() bool { return r.inflight() == 0 }},
		{"every cancelled request cancelled at the destination", 10 * time.Second, func() bool { return env.hanging.Load() == 0 }},
	} {
		if took, ok := pollUntil(c.limit, c.cond); !ok {
			unsettled = append(unsettled, fmt.Sprintf("after the traffic, not %s within %v", c.what, took.Round(time.Millisecond)))
		}
	}
	env.hc.CloseIdleConnections()
	env.pc.CloseIdleConnections()
	end := sampleNow(0)
	// Whether everything the traffic started has ended is checked once the
	// server and clients are stopped too (leakCheck): until then they keep
	// idle streams and destination connections for reuse, by design.

	twice, appRetries := env.executedTwice()
	t.Log(stats.report(d, faults, logs, idle, samples, end, twice, appRetries))

	for _, u := range unsettled {
		t.Error(u)
	}
	if stats.mismatched.Load() > 0 {
		t.Errorf("%d responses belonged to another request:\n%s", stats.mismatched.Load(), strings.Join(stats.mismatches, "\n"))
	}
	if twice > 0 {
		t.Errorf("%d requests reached the destination twice although sent once", twice)
	}
	if n := stats.causes[hangCause]; n > 0 {
		t.Errorf("%d operations hung for %v instead of failing fast", n, soakOpTimeout)
	}
	if stats.ok.Load() == 0 {
		t.Errorf("no operation succeeded")
	}
	for _, err := range trendErrors(samples) {
		t.Error(err)
	}
}

func soakSampleInterval(d time.Duration) time.Duration {
	return min(max(d/30, time.Second), 10*time.Second)
}

// soakEnv is what the operations talk to.
type soakEnv struct {
	r       *relay
	hc      *http.Client // to /request
	pc      *http.Client // forward-proxy mode
	http    string       // the HTTP destination's base URL
	ws      string       // the WebSocket echo's URL
	echo    string       // the TCP echo's host:port
	hanging atomic.Int64 // /hang requests the destination is holding

	mu         sync.Mutex
	hits       map[string]int  // guarded by mu: HTTP requests the destination got, by operation id
	appRetried map[string]bool // guarded by mu: operations the app's HTTP client itself sent twice
}

// executedTwice counts the operations whose request reached the
// destination more than once although the app sent it once: wsp sent it
// again after it had been delivered. appRetries counts those the app's
// own HTTP client retried (Go retries an idempotent request whose reused
// connection closed before any answer).
func (env *soakEnv) executedTwice() (twice, appRetries int) {
	env.mu.Lock()
	defer env.mu.Unlock()
	for id, k := range env.hits {
		if k > 1 && !env.appRetried[id] {
			twice++
		}
	}
	return twice, len(env.appRetried)
}

// traced notes when the app's HTTP client uses more than one connection
// for op id, that is, retries it.
func (env *soakEnv) traced(ctx context.Context, id string) context.Context {
	var conns atomic.Int32
	return httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{GotConn: func(httptrace.GotConnInfo) {
		if conns.Add(1) == 2 {
			env.mu.Lock()
			env.appRetried[id] = true
			env.mu.Unlock()
		}
	}})
}

func newSoakEnv(t *testing.T, r *relay) *soakEnv {
	env := &soakEnv{r: r, hits: map[string]int{}, appRetried: map[string]bool{}}
	b := backend(t, http.HandlerFunc(env.serveHTTP))
	env.http = b.URL
	env.ws = "ws" + strings.TrimPrefix(wsEcho(t).URL, "http") + "/echo"
	env.echo = tcpEcho(t)
	env.hc = loadClient(t, 2*soakWorkers, nil)
	proxyURL := mustParse(t, r.url)
	proxyURL.User = url.User("pool") // the proxy user name picks the pool
	env.pc = loadClient(t, soakWorkers, proxyURL)
	return env
}

// content is the body of a download of n bytes for op id: the id repeated,
// so that a body meant for another operation never matches.
func content(id string, off, n int64) []byte {
	unit := id + "|"
	b := make([]byte, n)
	for i := range b {
		b[i] = unit[(off+int64(i))%int64(len(unit))]
	}
	return b
}

func (env *soakEnv) serveHTTP(w http.ResponseWriter, req *http.Request) {
	kind, id, _ := strings.Cut(strings.TrimPrefix(req.URL.Path, "/"), "/")
	env.mu.Lock()
	env.hits[id]++
	env.mu.Unlock()
	switch kind {
	case "small":
		w.Header().Set("X-Op", id)
		io.WriteString(w, "small "+id)
	case "big":
		n, _ := strconv.ParseInt(req.URL.Query().Get("n"), 10, 64)
		w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
		for off := int64(0); off < n; off += 32 << 10 {
			if _, err := w.Write(content(id, off, min(32<<10, n-off))); err != nil {
				return
			}
		}
	case "upload":
		body, err := io.ReadAll(io.LimitReader(req.Body, 4<<20))
		if err != nil {
			return
		}
		w.Write(body)
	case "sse":
		w.Header().Set("Content-Type", "text/event-stream")
		for i := range 10 {
			fmt.Fprintf(w, "data: %s %d\n\n", id, i)
			w.(http.Flusher).Flush()
			select {
			case <-time.After(10 * time.Millisecond):
			case <-req.Context().Done():
				return
			}
		}
	case "hang":
		env.hanging.Add(1)
		defer env.hanging.Add(-1)
		select {
		case <-req.Context().Done():
		case <-time.After(soakOpTimeout):
			io.WriteString(w, "not cancelled")
		}
	default:
		http.NotFound(w, req)
	}
}

// soakOps are the operations of the mix, with their weights.
var soakOps = []struct {
	name   string
	weight int
	run    func(env *soakEnv, ctx context.Context, id string) error
}{
	{"small", 30, (*soakEnv).small},
	{"small-proxy", 10, (*soakEnv).smallProxy},
	{"download", 8, (*soakEnv).download},
	{"download-cancel", 4, (*soakEnv).downloadCancel},
	{"upload", 6, (*soakEnv).upload},
	{"sse", 10, (*soakEnv).sse},
	{"websocket", 8, (*soakEnv).websocket},
	{"connect", 8, (*soakEnv).connect},
	{"cancel", 8, (*soakEnv).cancelled},
}

// hangCause is an operation that outlived soakOpTimeout.
const hangCause = "HANG"

// work runs random operations until ctx ends.
func (env *soakEnv) work(ctx context.Context, worker int, stats *soakStats) {
	total := 0
	for _, op := range soakOps {
		total += op.weight
	}
	for i := 0; ctx.Err() == nil && i < 10_000_000; i++ {
		k := rand.IntN(total)
		op := soakOps[0]
		for _, o := range soakOps {
			if k < o.weight {
				op = o
				break
			}
			k -= o.weight
		}
		id := fmt.Sprintf("w%d-%d", worker, i)
		octx, cancel := context.WithTimeout(context.Background(), soakOpTimeout)
		err := op.run(env, octx, id)
		hung := octx.Err() == context.DeadlineExceeded
		cancel()
		stats.record(op.name, id, err, hung)
	}
}

func (env *soakEnv) get(ctx context.Context, hc *http.Client, id, url string, viaRequest bool) (*http.Response, error) {
	target := url
	if viaRequest {
		target = env.r.url + "/request"
	}
	req, err := http.NewRequestWithContext(env.traced(ctx, id), "GET", target, nil)
	if err != nil {
		return nil, err
	}
	if viaRequest {
		req.Header.Set("X-Proxy-Destination", url)
		req.Header.Set("X-Proxy-Client", "pool")
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != 200 {
		resp.Body.Close()
		return nil, &requestError{cause: errorCause(resp, nil), msg: url}
	}
	return resp, nil
}

func misfit(format string, args ...any) error {
	return &requestError{cause: mismatch, msg: fmt.Sprintf(format, args...)}
}

func (env *soakEnv) small(ctx context.Context, id string) error {
	return env.checkSmall(ctx, env.hc, id, true)
}

func (env *soakEnv) smallProxy(ctx context.Context, id string) error {
	return env.checkSmall(ctx, env.pc, id, false)
}

func (env *soakEnv) checkSmall(ctx context.Context, hc *http.Client, id string, viaRequest bool) error {
	resp, err := env.get(ctx, hc, id, env.http+"/small/"+id, viaRequest)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if string(body) != "small "+id || resp.Header.Get("X-Op") != id {
		return misfit("small %s: got %q (X-Op %q)", id, body, resp.Header.Get("X-Op"))
	}
	return nil
}

// readContent reads up to limit bytes of a download and checks them.
func readContent(r io.Reader, id string, limit int64) (int64, error) {
	buf := make([]byte, 32<<10)
	var off int64
	for off < limit {
		n, err := r.Read(buf[:min(int64(len(buf)), limit-off)])
		if n > 0 && !bytes.Equal(buf[:n], content(id, off, int64(n))) {
			return off, misfit("download %s: wrong bytes at offset %d", id, off)
		}
		off += int64(n)
		if err == io.EOF {
			return off, nil
		}
		if err != nil {
			return off, err
		}
	}
	return off, nil
}

func (env *soakEnv) download(ctx context.Context, id string) error {
	n := int64(1+rand.IntN(16)) << 20
	resp, err := env.get(ctx, env.hc, id, fmt.Sprintf("%s/big/%s?n=%d", env.http, id, n), true)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	got, err := readContent(resp.Body, id, n+1)
	if err != nil {
		return err
	}
	if got != n {
		return fmt.Errorf("download %s: %d of %d bytes: %w", id, got, n, io.ErrUnexpectedEOF)
	}
	return nil
}

// downloadCancel stops reading a download midway and cancels it.
func (env *soakEnv) downloadCancel(ctx context.Context, id string) error {
	n := int64(16 << 20)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	resp, err := env.get(ctx, env.hc, id, fmt.Sprintf("%s/big/%s?n=%d", env.http, id, n), true)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, err = readContent(resp.Body, id, int64(64<<10+rand.IntN(4<<20)))
	return err
}

func (env *soakEnv) upload(ctx context.Context, id string) error {
	body := content(id, 0, int64(64<<10+rand.IntN(1<<20)))
	req, err := http.NewRequestWithContext(env.traced(ctx, id), "POST", env.r.url+"/request", bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("X-Proxy-Destination", env.http+"/upload/"+id)
	req.Header.Set("X-Proxy-Client", "pool")
	resp, err := env.hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	got, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != 200 {
		return &requestError{cause: errorCause(resp, nil), msg: "upload " + id}
	}
	if !bytes.Equal(got, body) {
		return misfit("upload %s: %d bytes back, not the %d sent", id, len(got), len(body))
	}
	return nil
}

func (env *soakEnv) sse(ctx context.Context, id string) error {
	resp, err := env.get(ctx, env.hc, id, env.http+"/sse/"+id, true)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var want strings.Builder
	for i := range 10 {
		fmt.Fprintf(&want, "data: %s %d\n\n", id, i)
	}
	got, err := io.ReadAll(resp.Body)
	if !strings.HasPrefix(want.String(), string(got)) {
		return misfit("sse %s: got %q", id, got)
	}
	if err != nil {
		return err
	}
	if string(got) != want.String() {
		return fmt.Errorf("sse %s: %d of %d bytes: %w", id, len(got), want.Len(), io.ErrUnexpectedEOF)
	}
	return nil
}

func (env *soakEnv) websocket(ctx context.Context, id string) error {
	c, resp, err := websocket.Dial(ctx, "ws://"+env.r.addr+"/request", &websocket.DialOptions{
		HTTPHeader: http.Header{"X-Proxy-Destination": {env.ws}, "X-Proxy-Client": {"pool"}},
	})
	if err != nil {
		if resp != nil && resp.StatusCode != http.StatusSwitchingProtocols {
			return &requestError{cause: errorCause(resp, nil), msg: "websocket " + id}
		}
		return err
	}
	defer c.CloseNow()
	for i := range 20 {
		msg := fmt.Sprintf("%s %d", id, i)
		if err := c.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
			return err
		}
		_, got, err := c.Read(ctx)
		if err != nil {
			return err
		}
		if string(got) != msg {
			return misfit("websocket %s: sent %q, got %q", id, msg, got)
		}
	}
	return c.Close(websocket.StatusNormalClosure, "")
}

func (env *soakEnv) connect(ctx context.Context, id string) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", env.r.addr)
	if err != nil {
		return err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
	defer stop()
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\nX-Proxy-Client: pool\r\n\r\n", env.echo, env.echo)
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, &http.Request{Method: "CONNECT"})
	if err != nil {
		return err
	}
	if resp.StatusCode != 200 {
		return &requestError{cause: errorCause(resp, nil), msg: "connect " + id}
	}
	for i := range 10 {
		line := fmt.Sprintf("%s %d\n", id, i)
		if _, err := io.WriteString(c, line); err != nil {
			return err
		}
		got, err := br.ReadString('\n')
		if got != "" && got != line {
			return misfit("connect %s: sent %q, got %q", id, line, got)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// cancelled sends a request the destination holds and gives up on it
// after a few milliseconds: the app must see its own cancellation (and the
// destination its connection closed, checked at the end of the soak).
func (env *soakEnv) cancelled(ctx context.Context, id string) error {
	ctx, cancel := context.WithTimeout(ctx, time.Duration(5+rand.IntN(95))*time.Millisecond)
	defer cancel()
	resp, err := env.get(ctx, env.hc, id, env.http+"/hang/"+id, true)
	if err == nil {
		resp.Body.Close()
		return misfit("cancel %s: answered %d", id, resp.StatusCode)
	}
	if errors.Is(err, context.DeadlineExceeded) && ctx.Err() != nil {
		return nil // cancelled as planned
	}
	return err
}

// injectFaults switches the proxy between faults at random until ctx ends,
// and counts them. Black-holes last from well under to well over the two
// keepalive intervals after which a session is dropped.
func injectFaults(ctx context.Context, fp *faultproxy.Proxy, counts map[string]int) {
	wait := func(d time.Duration) bool {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-t.C:
			return true
		case <-ctx.Done():
			return false
		}
	}
	between := func(lo, hi time.Duration) time.Duration { return lo + rand.N(hi-lo) }
	for i := 0; i < 1_000_000; i++ {
		fp.Set(faultproxy.Pass)
		if !wait(between(500*time.Millisecond, 2*time.Second)) {
			return
		}
		switch k := rand.IntN(100); {
		case k < 30:
			d := between(time.Millisecond, 30*time.Millisecond)
			fp.SetDelay(d)
			counts["delay"]++
			if !wait(between(time.Second, 3*time.Second)) {
				return
			}
		case k < 65:
			fp.Set(faultproxy.BlackHole)
			counts["black-hole"]++
			if !wait(between(200*time.Millisecond, 2500*time.Millisecond)) {
				return
			}
		case k < 90:
			fp.Set(faultproxy.Reset)
			counts["reset"]++
			if !wait(between(10*time.Millisecond, 300*time.Millisecond)) {
				return
			}
		default:
			counts["none"]++
		}
	}
}

// sample is the process's state at one moment, after a GC.
type sample struct {
	at         time.Duration
	goroutines int
	fds        int
	heap       uint64 // live heap after a GC
	rss        uint64
}

func sampleNow(at time.Duration) sample {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return sample{at: at, goroutines: runtime.NumGoroutine(), fds: openFDs(), heap: m.HeapAlloc, rss: rss()}
}

// rss reads the resident set size from /proc (0 where there is none).
func rss() uint64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseUint(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10
		}
	}
	return 0
}

func sampleEvery(ctx context.Context, every time.Duration) []sample {
	start := time.Now()
	tick := time.NewTicker(every)
	defer tick.Stop()
	var out []sample
	for range 100_000 {
		select {
		case <-ctx.Done():
			return out
		case <-tick.C:
			out = append(out, sampleNow(time.Since(start)))
		}
	}
	return out
}

// trendErrors compares the last third of the samples with the first: a
// leak shows as a level that keeps rising. The margins absorb what the
// traffic has in flight at the moment of a sample, which varies.
func trendErrors(s []sample) []error {
	if len(s) < 6 {
		return nil // too short to tell
	}
	k := len(s) / 3
	first, last := s[:k], s[len(s)-k:]
	avg := func(ss []sample, f func(sample) float64) float64 {
		var sum float64
		for _, x := range ss {
			sum += f(x)
		}
		return sum / float64(len(ss))
	}
	var errs []error
	check := func(what string, f func(sample) float64, ratio, abs float64) {
		a, b := avg(first, f), avg(last, f)
		if b > a*ratio+abs {
			errs = append(errs, fmt.Errorf("%s rose: last third averages %.1f, first third %.1f (allowed %.1f)", what, b, a, a*ratio+abs))
		}
	}
	check("goroutines", func(x sample) float64 { return float64(x.goroutines) }, 1.25, 50)
	check("open fds", func(x sample) float64 { return float64(x.fds) }, 1.25, 20)
	check("heap MiB", func(x sample) float64 { return float64(x.heap) / (1 << 20) }, 1.5, 16)
	return errs
}

// soakStats counts outcomes by operation and errors by cause.
type soakStats struct {
	ok, failed, mismatched atomic.Int64

	mu         sync.Mutex
	kinds      map[string]*[2]int // guarded by mu: ok, failed
	causes     map[string]int     // guarded by mu
	examples   map[string]string  // guarded by mu: one message per cause
	mismatches []string           // guarded by mu: the first few
}

func newSoakStats() *soakStats {
	return &soakStats{kinds: map[string]*[2]int{}, causes: map[string]int{}, examples: map[string]string{}}
}

func (s *soakStats) record(kind, id string, err error, hung bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	k := s.kinds[kind]
	if k == nil {
		k = new([2]int)
		s.kinds[kind] = k
	}
	if err == nil {
		s.ok.Add(1)
		k[0]++
		return
	}
	s.failed.Add(1)
	k[1]++
	cause := causeOf(err)
	if hung {
		cause = hangCause
	}
	s.causes[cause]++
	if _, ok := s.examples[cause]; !ok {
		s.examples[cause] = kind + " " + id + ": " + err.Error()
	}
	if cause == mismatch {
		s.mismatched.Add(1)
		if len(s.mismatches) < 10 {
			s.mismatches = append(s.mismatches, err.Error())
		}
	}
}

func (s *soakStats) report(d time.Duration, faults map[string]int, logs *logCounter, idle sample, samples []sample, end sample, twice, appRetries int) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var b strings.Builder
	fmt.Fprintf(&b, "soak %v: %d workers; server and 2 clients of pool \"pool\" (keepalive %v), one through the fault proxy, one direct\n", d, soakWorkers, soakKeepAlive)
	fmt.Fprintf(&b, "faults injected: %s\n", sortedCounts(faults))
	total := s.ok.Load() + s.failed.Load()
	fmt.Fprintf(&b, "operations: %d (%.0f/s), %d ok, %d failed, %d mismatched\n", total, float64(total)/d.Seconds(), s.ok.Load(), s.failed.Load(), s.mismatched.Load())
	fmt.Fprintf(&b, "HTTP requests the destination received twice: %d; retried by the app's own HTTP client: %d\n", twice, appRetries)
	for _, op := range soakOps {
		if k := s.kinds[op.name]; k != nil {
			fmt.Fprintf(&b, "  %-16s %7d ok %6d failed\n", op.name, k[0], k[1])
		}
	}
	b.WriteString("errors by cause:\n")
	for _, c := range byCount(s.causes) {
		fmt.Fprintf(&b, "  %7d  %-28s e.g. %.160s\n", s.causes[c], c, s.examples[c])
	}
	b.WriteString("log lines by component, level and message:\n")
	logs.mu.Lock()
	for _, c := range byCount(logs.counts) {
		fmt.Fprintf(&b, "  %7d  %s\n", logs.counts[c], c)
	}
	logs.mu.Unlock()
	fmt.Fprintf(&b, "resources (after a GC; goroutines and fds of the whole test process):\n")
	fmt.Fprintf(&b, "  %8s %10s %5s %9s %9s\n", "t", "goroutines", "fds", "heap MiB", "rss MiB")
	row := func(label string, x sample) {
		fmt.Fprintf(&b, "  %8s %10d %5d %9.1f %9.1f\n", label, x.goroutines, x.fds, float64(x.heap)/(1<<20), float64(x.rss)/(1<<20))
	}
	row("idle", idle)
	for _, x := range samples {
		row(x.at.Round(time.Second).String(), x)
	}
	row("end", end)
	b.WriteString("  (idle: before the traffic; end: after it, every session up again, nothing in flight, the apps' idle connections closed)\n")
	if k := len(samples) / 3; k > 0 {
		first, last := samples[:k], samples[len(samples)-k:]
		fmt.Fprintf(&b, "first third avg: %s\nlast third avg:  %s\n", avgRow(first), avgRow(last))
	}
	return b.String()
}

func avgRow(ss []sample) string {
	var g, f, h, r float64
	for _, x := range ss {
		g += float64(x.goroutines)
		f += float64(x.fds)
		h += float64(x.heap)
		r += float64(x.rss)
	}
	n := float64(len(ss))
	return fmt.Sprintf("goroutines %.1f, fds %.1f, heap %.1f MiB, rss %.1f MiB", g/n, f/n, h/n/(1<<20), r/n/(1<<20))
}

func byCount(m map[string]int) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b string) int {
		if m[a] != m[b] {
			return m[b] - m[a]
		}
		return strings.Compare(a, b)
	})
	return keys
}

func sortedCounts(m map[string]int) string {
	var parts []string
	for _, k := range byCount(m) {
		parts = append(parts, fmt.Sprintf("%d %s", m[k], k))
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}

// logCounter counts log records by component, level and message (and the
// error code of access lines), which is what an operator would see in the
// logs; errors are also passed to the test log.
type logCounter struct {
	t      testing.TB
	mu     sync.Mutex
	counts map[string]int // guarded by mu
}

func (l *logCounter) logger(component string) *slog.Logger {
	return slog.New(&countHandler{l: l, component: component})
}

type countHandler struct {
	l         *logCounter
	component string
}

func (h *countHandler) Enabled(context.Context, slog.Level) bool { return true }

func (h *countHandler) Handle(_ context.Context, r slog.Record) error {
	if r.Level < slog.LevelInfo {
		return nil
	}
	key := fmt.Sprintf("%-13s %-5s %s", h.component, r.Level, r.Message)
	r.Attrs(func(a slog.Attr) bool {
		if a.Key == "error" || (a.Key == "cause" && r.Message != "request") {
			v := digits.ReplaceAllString(a.Value.String(), "N")
			if len(v) > 60 {
				v = v[:60] + "…"
			}
			key += " " + a.Key + "=" + v
		}
		return true
	})
	h.l.mu.Lock()
	h.l.counts[key]++
	h.l.mu.Unlock()
	if r.Level >= slog.LevelError {
		(&tWriter{t: h.l.t}).Write([]byte(h.component + ": " + r.Message))
	}
	return nil
}

func (h *countHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *countHandler) WithGroup(string) slog.Handler      { return h }
