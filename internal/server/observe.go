package server

import (
	"crypto/rand"
	"encoding/hex"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// headerRequestID carries a request's id: taken from the app when it sends
// a sane one, else made up; passed to the destination and returned to the app.
const headerRequestID = "X-Request-Id"

// requestID returns the app's id when usable, else a new one.
func requestID(r *http.Request) string {
	if id := r.Header.Get(headerRequestID); id != "" && len(id) <= 128 && printable(id) {
		return id
	}
	var b [8]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func printable(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < ' ' || s[i] > '~' {
			return false
		}
	}
	return true
}

// ErrorInfo is one failed request, as the dashboard lists it.
type ErrorInfo struct {
	Time    time.Time `json:"time"`
	Entry   string    `json:"entry"`
	Status  int       `json:"status"`
	Code    string    `json:"code"`
	Client  string    `json:"client,omitempty"`
	Session string    `json:"session,omitempty"`
	Host    string    `json:"host"`
	Message string    `json:"message"`
}

// recentErrors keeps the last few failures for the dashboard.
type recentErrors struct {
	mu   sync.Mutex
	ring [50]ErrorInfo // guarded by mu
	next int           // guarded by mu: where the next one goes
	n    int           // guarded by mu: how many are held
}

func (e *recentErrors) add(info ErrorInfo) {
	e.mu.Lock()
	e.ring[e.next] = info
	e.next = (e.next + 1) % len(e.ring)
	e.n = min(e.n+1, len(e.ring))
	e.mu.Unlock()
}

// list returns the held failures, newest first.
func (e *recentErrors) list() []ErrorInfo {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make([]ErrorInfo, 0, e.n)
	for i := 1; i <= e.n; i++ {
		out = append(out, e.ring[(e.next-i+len(e.ring))%len(e.ring)])
	}
	return out
}

// totals are the server's counters since it started, for /api/stats.
type totals struct {
	requests atomic.Int64
	errors   atomic.Int64
	bytesIn  atomic.Int64
	bytesOut atomic.Int64
}

// begin starts observing an exchange: it takes or makes the request id and
// counts the request in flight.
func (s *Server) begin(r *http.Request, x *exchange, rec *recorder) {
	x.start = time.Now()
	x.id = requestID(r)
	r.Header.Set(headerRequestID, x.id)
	rec.Header().Set(headerRequestID, x.id)
	x.end = s.metrics.Begin(x.entry)
	s.totals.requests.Add(1) // counted when they start, as sessions count theirs
	if r.Body != nil && r.Body != http.NoBody {
		r.Body = &countingBody{ReadCloser: r.Body, n: &x.bytesIn}
	}
}

// finish records the end of an exchange: one access log line, metrics, the
// serving session's counters and, for a failure, the recent errors.
func (s *Server) finish(r *http.Request, x *exchange, rec *recorder) {
	d := time.Since(x.start)
	in := x.bytesIn.Load()
	x.end(x.clientID, rec.status, in, rec.bytes, d)
	s.totals.bytesIn.Add(in)
	s.totals.bytesOut.Add(rec.bytes)
	if x.session != nil {
		x.session.bytesIn.Add(in)
		x.session.bytesOut.Add(rec.bytes)
	}
	attrs := []any{
		"id", x.id,
		"entry", x.entry,
		"client", x.clientID,
		"session", x.sessionID,
		"method", r.Method,
		"host", x.dest.Host,
		"status", rec.status,
		"bytes_in", in,
		"bytes_out", rec.bytes,
		"duration", d.Round(time.Microsecond),
	}
	if x.node != "" {
		attrs = append(attrs, "node", x.node) // forwarded to that node
	}
	if x.via != "" {
		attrs = append(attrs, "via", x.via) // forwarded here by that node
	}
	if x.err != nil {
		attrs = append(attrs, "error", x.err.Code, "cause", x.err.Error())
		s.totals.errors.Add(1)
		info := ErrorInfo{Time: time.Now(), Entry: x.entry, Status: x.err.Status, Code: x.err.Code,
			Client: x.clientID, Session: x.sessionID, Host: x.dest.Host, Message: x.err.Msg}
		s.errors.add(info)
		if x.session != nil {
			x.session.lastErr.Store(&info)
		}
	}
	s.log.Info("request", attrs...)
}

// countingBody counts the bytes of an app's request body as they are read,
// possibly by the goroutine sending them on.
type countingBody struct {
	io.ReadCloser
	n *atomic.Int64
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.n.Add(int64(n))
	return n, err
}
