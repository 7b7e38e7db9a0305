package test

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"wsp/internal/legacy"
)

// oldServer behaves like a root-gg/wsp server, written from
// LEGACY-PROTOCOL.md: /register upgrades without a subprotocol after
// checking X-SECRET-KEY (526 "Invalid X-SECRET-KEY" otherwise), reads the
// greeting and pools the connections by id; /request takes an idle
// connection (waiting up to timeout), sends the JSON head and the body,
// reads the JSON answer and its body, and hands the connection back. Like
// the original it reads every connection all the time (so pings are
// answered) and closes one that sends a message while idle.
type oldServer struct {
	t       testing.TB
	secret  string
	timeout time.Duration
	srv     *httptest.Server
	url     string // http://host:port
	readers sync.WaitGroup
	// noPong makes new connections ignore pings, as a server that hung
	// would.
	noPong atomic.Bool

	mu        sync.Mutex
	idle      []*oldConn            // guarded by mu: oldest first
	live      map[*oldConn]struct{} // guarded by mu: every connection up
	most      int                   // guarded by mu: the most connections up at once
	rejected  int                   // guarded by mu: upgrades refused for the key
	greetings []string              // guarded by mu
	headers   []http.Header         // guarded by mu: the upgrade requests' headers
	changed   chan struct{}         // guarded by mu: closed and replaced on every change
	closed    bool                  // guarded by mu
}

// oldConn is one client connection as the old server holds it.
type oldConn struct {
	ws   *websocket.Conn
	id   string
	busy bool          // guarded by the server's mu
	msgs chan oldMsg   // the answer's two messages, from the reader
	done chan struct{} // closed when the reader has ended
}

type oldMsg struct {
	typ  int
	data []byte
}

func startOldServer(t testing.TB, secret string, timeout time.Duration) *oldServer {
	s := &oldServer{t: t, secret: secret, timeout: timeout, live: map[*oldConn]struct{}{}, changed: make(chan struct{})}
	mux := http.NewServeMux()
	mux.HandleFunc("/register", s.register)
	mux.HandleFunc("/request", s.request)
	s.srv = httptest.NewServer(mux)
	s.url = s.srv.URL
	t.Cleanup(s.close)
	return s
}

// registerURL is the target a client connects to.
func (s *oldServer) registerURL() string {
	return "ws" + strings.TrimPrefix(s.url, "http") + "/register"
}

// signal wakes everyone waiting for a change; mu must be held.
func (s *oldServer) signal() {
	close(s.changed)
	s.changed = make(chan struct{})
}

func (s *oldServer) register(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	s.headers = append(s.headers, r.Header.Clone())
	if r.Header.Get("X-SECRET-KEY") != s.secret {
		s.rejected++
		s.mu.Unlock()
		http.Error(w, "Invalid X-SECRET-KEY", 526)
		return
	}
	s.mu.Unlock()
	up := websocket.Upgrader{CheckOrigin: func(*http.Request) bool { return true }}
	ws, err := up.Upgrade(w, r, nil)
	if err != nil {
		return
	}
	ws.SetReadLimit(256 << 20)
	if s.noPong.Load() {
		ws.SetPingHandler(func(string) error { return nil })
	}
	ws.SetReadDeadline(time.Now().Add(10 * time.Second))
	typ, greeting, err := ws.ReadMessage()
	ws.SetReadDeadline(time.Time{})
	if err != nil || typ != websocket.TextMessage {
		ws.Close()
		return
	}
	id, _, err := legacy.ParseGreeting(string(greeting))
	if err != nil {
		ws.Close()
		return
	}
	c := &oldConn{ws: ws, id: id, msgs: make(chan oldMsg, 2), done: make(chan struct{})}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ws.Close()
		return
	}
	s.greetings = append(s.greetings, string(greeting))
	s.live[c] = struct{}{}
	s.most = max(s.most, len(s.live))
	s.idle = append(s.idle, c)
	s.signal()
	s.readers.Add(1)
	s.mu.Unlock()
	go s.read(c)
}

// read hands c's messages to the request using it, and removes c when it
// ends. A message while c is idle is unexpected: c is closed.
func (s *oldServer) read(c *oldConn) {
	defer s.readers.Done()
	defer close(c.done)
	for {
		typ, data, err := c.ws.ReadMessage()
		if err != nil {
			break
		}
		s.mu.Lock()
		busy := c.busy
		s.mu.Unlock()
		if !busy {
			break
		}
		select {
		case c.msgs <- oldMsg{typ, data}:
		default: // more than an answer's two messages
		}
	}
	c.ws.Close()
	s.mu.Lock()
	delete(s.live, c)
	for i, ic := range s.idle {
		if ic == c {
			s.idle = append(s.idle[:i], s.idle[i+1:]...)
			break
		}
	}
	s.signal()
	s.mu.Unlock()
}

// take returns an idle connection, waiting up to the server's timeout.
func (s *oldServer) take(r *http.Request) *oldConn {
	timer := time.NewTimer(s.timeout)
	defer timer.Stop()
	for {
		s.mu.Lock()
		if len(s.idle) > 0 {
			c := s.idle[0]
			s.idle = s.idle[1:]
			c.busy = true
			s.signal()
			s.mu.Unlock()
			return c
		}
		ch := s.changed
		s.mu.Unlock()
		select {
		case <-ch:
		case <-timer.C:
			return nil
		case <-r.Context().Done():
			return nil
		}
	}
}

// release makes c idle again, or closes it after a failed exchange.
func (s *oldServer) release(c *oldConn, ok bool) {
	if !ok {
		c.ws.Close()
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, up := s.live[c]; !up {
		return
	}
	c.busy = false
	s.idle = append(s.idle, c)
	s.signal()
}

// recv waits for the next message of c's answer.
func (s *oldServer) recv(c *oldConn, timer *time.Timer) (oldMsg, bool) {
	select {
	case m := <-c.msgs:
		return m, true
	case <-c.done:
		select {
		case m := <-c.msgs:
			return m, true
		default:
			return oldMsg{}, false
		}
	case <-timer.C:
		return oldMsg{}, false
	}
}

func (s *oldServer) request(w http.ResponseWriter, r *http.Request) {
	dest := r.Header.Get("X-PROXY-DESTINATION")
	if dest == "" {
		http.Error(w, "Missing X-PROXY-DESTINATION header", 526)
		return
	}
	body, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, "Unable to read the request body", 526)
		return
	}
	c := s.take(r)
	if c == nil {
		http.Error(w, "Unable to get a proxy connection", 526)
		return
	}
	ok := false
	defer func() { s.release(c, ok) }()
	head, _ := json.Marshal(legacy.RequestHead{Method: r.Method, URL: dest, Header: r.Header, ContentLength: r.ContentLength})
	c.ws.SetWriteDeadline(time.Now().Add(10 * time.Second))
	if c.ws.WriteMessage(websocket.TextMessage, head) != nil || c.ws.WriteMessage(websocket.BinaryMessage, body) != nil {
		http.Error(w, "Unable to write the request", 526)
		return
	}
	timer := time.NewTimer(30 * time.Second)
	defer timer.Stop()
	m, got := s.recv(c, timer)
	if !got || m.typ != websocket.TextMessage {
		http.Error(w, "Unable to read the response head", 526)
		return
	}
	resp, err := legacy.DecodeResponseHead(m.data)
	if err != nil {
		http.Error(w, "Unable to decode the response head", 526)
		return
	}
	m, got = s.recv(c, timer)
	if !got || m.typ != websocket.BinaryMessage {
		http.Error(w, "Unable to read the response body", 526)
		return
	}
	ok = true
	for k, v := range resp.Header {
		w.Header()[k] = v
	}
	w.WriteHeader(resp.StatusCode)
	w.Write(m.data)
}

// close ends every connection, waits for the readers, then stops the
// listener; idempotent.
func (s *oldServer) close() {
	s.mu.Lock()
	s.closed = true
	conns := make([]*oldConn, 0, len(s.live))
	for c := range s.live {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.ws.Close()
	}
	s.readers.Wait()
	s.srv.Close()
}

// counts says how many connections are up and how many of them are idle.
func (s *oldServer) counts() (live, idle int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.live), len(s.idle)
}

// mostConns is the most connections that were up at once.
func (s *oldServer) mostConns() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.most
}

func (s *oldServer) rejections() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.rejected
}

// liveConns is the set of connections up.
func (s *oldServer) liveConns() map[*oldConn]bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := make(map[*oldConn]bool, len(s.live))
	for c := range s.live {
		m[c] = true
	}
	return m
}

// takeIdle removes an idle connection from the pool, for a test to misuse.
func (s *oldServer) takeIdle() *oldConn {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.idle) == 0 {
		return nil
	}
	c := s.idle[0]
	s.idle = s.idle[1:]
	c.busy = true
	return c
}
