package client

import (
	"bufio"
	"context"
	"crypto/tls"
	"net"
	"net/url"
	"sync"
	"time"
)

// backendConn is one connection to a destination, kept alive between
// requests like http.Transport would, without its per-connection goroutines.
type backendConn struct {
	net.Conn
	key   string
	br    *bufio.Reader
	bw    *bufio.Writer
	idled time.Time // when it went back to the pool
}

// backendPool dials destinations and keeps idle connections for reuse.
type backendPool struct {
	dialer      net.Dialer
	tls         *tls.Config // for https destinations; cloned per dial for ServerName
	maxIdle     func() int  // per destination; read at each put, so it may grow
	idleTimeout time.Duration

	mu     sync.Mutex
	idle   map[string][]*backendConn // guarded by mu; most recently used last
	closed bool                      // guarded by mu
}

func newBackendPool(dialTimeout time.Duration, maxIdle func() int) *backendPool {
	return &backendPool{
		dialer:      net.Dialer{Timeout: dialTimeout, KeepAlive: 30 * time.Second},
		tls:         &tls.Config{NextProtos: []string{"http/1.1"}},
		maxIdle:     maxIdle,
		idleTimeout: 90 * time.Second,
		idle:        map[string][]*backendConn{},
	}
}

// hostPort is the address to dial for u, with the scheme's default port.
func hostPort(u *url.URL) string {
	if u.Port() != "" {
		return u.Host
	}
	if u.Scheme == "https" {
		return net.JoinHostPort(u.Hostname(), "443")
	}
	return net.JoinHostPort(u.Hostname(), "80")
}

// get returns an idle connection to u's destination, or dials one. reused
// says whether it served a request before (and so may have been closed by
// the destination meanwhile).
func (p *backendPool) get(ctx context.Context, u *url.URL) (bc *backendConn, reused bool, err error) {
	addr := hostPort(u)
	key := u.Scheme + "://" + addr
	if bc := p.takeIdle(key); bc != nil {
		return bc, true, nil
	}
	conn, err := p.dialer.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, false, err
	}
	if u.Scheme == "https" {
		cfg := p.tls.Clone()
		cfg.ServerName = u.Hostname()
		tc := tls.Client(conn, cfg)
		if err := tc.HandshakeContext(ctx); err != nil {
			conn.Close()
			return nil, false, err
		}
		conn = tc
	}
	return &backendConn{
		Conn: conn,
		key:  key,
		br:   bufio.NewReaderSize(conn, 4096),
		bw:   bufio.NewWriterSize(conn, 4096),
	}, false, nil
}

func (p *backendPool) takeIdle(key string) *backendConn {
	now := time.Now()
	var stale []*backendConn
	defer func() {
		for _, bc := range stale { // closing a TLS conn writes: never under mu
			bc.Close()
		}
	}()
	p.mu.Lock()
	defer p.mu.Unlock()
	list := p.idle[key]
	for len(list) > 0 {
		bc := list[len(list)-1]
		list[len(list)-1] = nil
		list = list[:len(list)-1]
		if now.Sub(bc.idled) < p.idleTimeout {
			p.idle[key] = list
			return bc
		}
		stale = append(stale, bc)
	}
	delete(p.idle, key)
	return nil
}

// put returns a connection whose exchange completed cleanly.
func (p *backendPool) put(bc *backendConn) {
	bc.idled = time.Now()
	p.mu.Lock()
	if p.closed || len(p.idle[bc.key]) >= p.maxIdle() || bc.br.Buffered() > 0 {
		p.mu.Unlock()
		bc.Close()
		return
	}
	p.idle[bc.key] = append(p.idle[bc.key], bc)
	p.mu.Unlock()
}

// close closes the idle connections and stops keeping any.
func (p *backendPool) close() {
	p.mu.Lock()
	idle := p.idle
	p.idle, p.closed = map[string][]*backendConn{}, true
	p.mu.Unlock()
	for _, list := range idle {
		for _, bc := range list {
			bc.Close()
		}
	}
}
