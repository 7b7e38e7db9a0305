// Package faultproxy is a TCP proxy that puts network faults between two
// peers, for tests and soaks: it passes bytes through, delays them,
// black-holes them (connections stay open and nothing moves, with no FIN
// and no RST, as behind a NAT that forgot them or a pulled cable), or resets
// connections. The fault can change at any time and applies at once to
// every connection, current and future.
//
// The proxy is meant for loopback tests: it never buffers more than a few
// chunks per direction and per connection, so a held direction stops its
// sender the way a silent network does once the socket buffers fill.
package faultproxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Mode is the fault the proxy applies.
type Mode int

const (
	// Pass forwards bytes as they come, half-closes (FIN) and resets
	// included.
	Pass Mode = iota
	// Delay forwards every chunk a fixed time after it was read, in each
	// direction (see SetDelay). With at most queueLen chunks held per
	// direction, a delayed direction carries at most 256 KiB per delay, as
	// a link with that bandwidth-delay product would.
	Delay
	// BlackHole forwards nothing, neither bytes nor FIN nor RST, and holds
	// new connections accepted but not connected to the target. What was
	// held is delivered in order if the mode returns to Pass or Delay, as
	// TCP retransmissions would after a network outage.
	BlackHole
	// Reset resets (RST) every current connection, on both sides, and
	// every new one as soon as it is accepted.
	Reset
)

func (m Mode) String() string {
	switch m {
	case Pass:
		return "pass"
	case Delay:
		return "delay"
	case BlackHole:
		return "black-hole"
	case Reset:
		return "reset"
	}
	return fmt.Sprintf("Mode(%d)", int(m))
}

const (
	// chunkSize is the most one read takes from a connection.
	chunkSize = 32 << 10
	// queueLen bounds the chunks read but not yet forwarded, per direction.
	queueLen = 8
	// dialTimeout bounds connecting to the target.
	dialTimeout = 5 * time.Second
)

var chunks = sync.Pool{New: func() any { b := make([]byte, chunkSize); return &b }}

// Proxy accepts connections and forwards them to one target address,
// applying the current fault. Create it with New or NewFromListener; Close
// stops it.
type Proxy struct {
	ln     net.Listener
	target string
	dialer net.Dialer

	mu      sync.Mutex
	mode    Mode               // guarded by mu
	delay   time.Duration      // guarded by mu: the Delay mode's delay
	changed chan struct{}      // guarded by mu: closed and replaced when the fault changes
	links   map[*link]struct{} // guarded by mu: connections not yet torn down
	closed  bool               // guarded by mu

	accepted atomic.Int64

	// wg counts the accept loop and each connection's run goroutine, which
	// waits for the goroutines it starts itself. Close waits for all.
	wg sync.WaitGroup
}

// New listens on a fresh loopback port and forwards to target (host:port).
func New(target string) (*Proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("faultproxy: listen: %w", err)
	}
	return NewFromListener(ln, target), nil
}

// NewFromListener accepts on ln, which the proxy then owns, and forwards to
// target.
func NewFromListener(ln net.Listener, target string) *Proxy {
	p := &Proxy{
		ln:      ln,
		target:  target,
		dialer:  net.Dialer{Timeout: dialTimeout},
		changed: make(chan struct{}),
		links:   map[*link]struct{}{},
	}
	p.wg.Add(1)
	go p.acceptLoop()
	return p
}

// Addr is the address the proxy listens on, host:port.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Target is the address the proxy forwards to.
func (p *Proxy) Target() string { return p.target }

// Mode returns the current fault.
func (p *Proxy) Mode() Mode {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.mode
}

// Conns returns how many accepted connections are not yet torn down.
func (p *Proxy) Conns() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.links)
}

// Accepted returns how many connections the proxy ever accepted.
func (p *Proxy) Accepted() int64 { return p.accepted.Load() }

// Set switches to mode m for every connection, current and future. Set(Delay)
// uses the delay last given to SetDelay (zero at first).
func (p *Proxy) Set(m Mode) { p.set(m, -1) }

// SetDelay switches to Delay mode with delay d in each direction.
func (p *Proxy) SetDelay(d time.Duration) { p.set(Delay, max(d, 0)) }

func (p *Proxy) set(m Mode, d time.Duration) {
	p.mu.Lock()
	p.mode = m
	if d >= 0 {
		p.delay = d
	}
	close(p.changed)
	p.changed = make(chan struct{})
	var victims []*link
	if m == Reset {
		for l := range p.links {
			victims = append(victims, l)
		}
	}
	p.mu.Unlock()
	for _, l := range victims { // closing sockets: never under mu
		l.teardown(true)
	}
}

// fault is a snapshot of the current fault; changed is closed when it
// no longer holds.
type fault struct {
	mode    Mode
	delay   time.Duration
	changed <-chan struct{}
}

func (p *Proxy) fault() fault {
	p.mu.Lock()
	defer p.mu.Unlock()
	return fault{mode: p.mode, delay: p.delay, changed: p.changed}
}

// Close stops accepting, closes every connection (without RST) and returns
// once every goroutine of the proxy has. It is idempotent.
func (p *Proxy) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		p.wg.Wait()
		return nil
	}
	p.closed = true
	links := make([]*link, 0, len(p.links))
	for l := range p.links {
		links = append(links, l)
	}
	p.mu.Unlock()
	err := p.ln.Close()
	for _, l := range links {
		l.teardown(false)
	}
	p.wg.Wait()
	if errors.Is(err, net.ErrClosed) {
		err = nil
	}
	return err
}

func (p *Proxy) acceptLoop() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() && !p.isClosed() {
				continue
			}
			return // closed, or broken for good (nothing a test could fix)
		}
		p.accepted.Add(1)
		ctx, cancel := context.WithCancel(context.Background())
		l := &link{p: p, a: c, ctx: ctx, cancel: cancel}
		switch p.add(l) {
		case addClosed:
			cancel()
			c.Close()
		case addReset:
			cancel()
			rst(c)
		case addOK:
			go l.run()
		}
	}
}

func (p *Proxy) isClosed() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.closed
}

type addResult int

const (
	addOK addResult = iota
	addClosed
	addReset
)

// add registers l, and counts its goroutine, unless the proxy is closed or
// resetting everything.
func (p *Proxy) add(l *link) addResult {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case p.closed:
		return addClosed
	case p.mode == Reset:
		return addReset
	}
	p.links[l] = struct{}{}
	p.wg.Add(1) // under mu, so never after Close began waiting
	return addOK
}

func (p *Proxy) remove(l *link) {
	p.mu.Lock()
	delete(p.links, l)
	p.mu.Unlock()
}

// link is one proxied connection: a, accepted from a peer, and b, dialed to
// the target. Its run goroutine owns both.
type link struct {
	p      *Proxy
	a      net.Conn
	ctx    context.Context // done once the link is torn down
	cancel context.CancelFunc

	mu   sync.Mutex
	b    net.Conn // guarded by mu; nil until dialed
	torn bool     // guarded by mu

	once sync.Once
}

func (l *link) run() {
	defer l.p.wg.Done()
	defer l.p.remove(l)
	defer l.teardown(false)

	// A connection accepted during a black-hole waits here unconnected, as
	// one whose packets a network drops would, and goes through late if the
	// fault lifts first.
	for f := l.p.fault(); f.mode == BlackHole; f = l.p.fault() {
		select {
		case <-f.changed:
		case <-l.ctx.Done():
			return
		}
	}
	b, err := l.p.dialer.DialContext(l.ctx, "tcp", l.p.target)
	if err != nil {
		l.teardown(true) // target down: the peer sees a refused connection as an RST
		return
	}
	if !l.attach(b) {
		b.Close()
		return
	}
	upDone := make(chan struct{})
	go func() {
		defer close(upDone)
		l.pipe(b, l.a)
	}()
	l.pipe(l.a, b)
	<-upDone
}

func (l *link) attach(b net.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.torn {
		return false
	}
	l.b = b
	return true
}

// teardown closes both connections, with an RST to each peer when rst is
// set, and wakes every goroutine of the link. Only the first call acts.
func (l *link) teardown(reset bool) {
	l.once.Do(func() {
		l.mu.Lock()
		l.torn = true
		b := l.b
		l.mu.Unlock()
		l.cancel()
		for _, c := range []net.Conn{l.a, b} {
			if c == nil {
				continue
			}
			if reset {
				rst(c)
			} else {
				c.Close()
			}
		}
	})
}

// chunk is what one read returned, stamped with when it was read.
type chunk struct {
	buf *[]byte
	n   int
	at  time.Time
	err error
}

// pipe forwards src to dst until src ends (then it half-closes dst) or
// either fails (then it tears the link down, passing a reset on). A reader
// goroutine fills a short queue; this one holds each chunk as long as the
// fault says and writes it.
func (l *link) pipe(dst, src net.Conn) {
	q := make(chan chunk, queueLen)
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		for {
			bp := chunks.Get().(*[]byte)
			n, err := src.Read(*bp)
			select {
			case q <- chunk{buf: bp, n: n, at: time.Now(), err: err}:
			case <-l.ctx.Done():
				chunks.Put(bp)
				return
			}
			if err != nil {
				return
			}
		}
	}()
	defer func() {
		<-readerDone
		for { // return what is left queued to the pool
			select {
			case c := <-q:
				chunks.Put(c.buf)
			default:
				return
			}
		}
	}()

	for {
		var c chunk
		select {
		case c = <-q:
		case <-l.ctx.Done():
			return
		}
		if !l.hold(c.at) {
			chunks.Put(c.buf)
			return
		}
		if c.n > 0 {
			_, err := dst.Write((*c.buf)[:c.n])
			if err != nil {
				chunks.Put(c.buf)
				l.teardown(true)
				return
			}
		}
		chunks.Put(c.buf)
		switch {
		case c.err == nil:
		case c.err == io.EOF:
			closeWrite(dst)
			return
		default:
			// A peer that reset its connection, or one closed under us.
			l.teardown(errors.Is(c.err, syscall.ECONNRESET))
			return
		}
	}
}

// hold waits until a chunk read at `at` may go out under the current fault;
// false if the link was torn down meanwhile.
func (l *link) hold(at time.Time) bool {
	for {
		f := l.p.fault()
		switch f.mode {
		case Pass:
			return true
		case Delay:
			wait := time.Until(at.Add(f.delay))
			if wait <= 0 {
				return true
			}
			t := time.NewTimer(wait)
			select {
			case <-t.C:
				return true
			case <-f.changed:
				t.Stop()
			case <-l.ctx.Done():
				t.Stop()
				return false
			}
		default: // BlackHole holds; Reset tears every link down itself
			select {
			case <-f.changed:
			case <-l.ctx.Done():
				return false
			}
		}
	}
}

// rst closes c so that its peer gets an RST rather than a FIN.
func rst(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	c.Close()
}

func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
		return
	}
	c.Close()
}
