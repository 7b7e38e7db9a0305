// Package forward is the app-side helper of `wsp forward`: it listens
// locally and carries each accepted connection through a CONNECT tunnel of
// a wsp server, for apps that cannot use an HTTP proxy (databases, SSH).
package forward

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"wsp/internal/tunnel"
)

// Config says where to listen and what to reach through which server.
type Config struct {
	Server string // wsp server URL: http://host:port or https://host:port
	To     string // destination host:port, reached by a client
	Client string // client pool id; "" lets the server choose
	Auth   string // "user:password" sent as Proxy-Authorization; "" for none
	// DialTimeout bounds connecting to the server and its CONNECT answer.
	DialTimeout time.Duration
}

// Validate reports the first bad field, named as its flag.
func (c Config) Validate() error {
	u, err := url.Parse(c.Server)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return fmt.Errorf("-server %q: want http://host:port or https://host:port", c.Server)
	}
	if _, port, err := net.SplitHostPort(c.To); err != nil || port == "" {
		return fmt.Errorf("-to %q: want host:port", c.To)
	}
	if c.Client != "" && !tunnel.ValidID(c.Client) {
		return fmt.Errorf("-client %q: not a valid client id", c.Client)
	}
	if c.Auth != "" && !strings.Contains(c.Auth, ":") {
		return errors.New("-auth: want user:password")
	}
	return nil
}

// Forwarder carries connections accepted on a listener to Config.To.
type Forwarder struct {
	cfg    Config
	log    *slog.Logger
	server *url.URL
}

// New checks cfg and returns a Forwarder.
func New(cfg Config, log *slog.Logger) (*Forwarder, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = 10 * time.Second
	}
	u, _ := url.Parse(cfg.Server)
	return &Forwarder{cfg: cfg, log: log, server: u}, nil
}

// Serve accepts on ln until ctx ends, then closes ln and every connection
// still open, and returns once their goroutines are done.
func (f *Forwarder) Serve(ctx context.Context, ln net.Listener) error {
	var wg sync.WaitGroup
	var mu sync.Mutex
	open := map[net.Conn]struct{}{} // guarded by mu
	stop := context.AfterFunc(ctx, func() {
		ln.Close()
		mu.Lock()
		for c := range open {
			c.Close()
		}
		mu.Unlock()
	})
	defer stop()
	defer wg.Wait()
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		mu.Lock()
		open[conn] = struct{}{}
		mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() {
				mu.Lock()
				delete(open, conn)
				mu.Unlock()
			}()
			f.carry(ctx, conn)
		}()
	}
}

// carry joins one local connection to a tunnel.
func (f *Forwarder) carry(ctx context.Context, local net.Conn) {
	defer local.Close()
	start := time.Now()
	remote, br, err := f.dial(ctx)
	if err != nil {
		f.log.Warn("tunnel refused", "from", local.RemoteAddr().String(), "to", f.cfg.To, "cause", err)
		return
	}
	up, down := tunnel.Join(tunnel.End{Conn: local}, tunnel.End{Conn: remote, Reader: br}, 0)
	f.log.Info("tunnel closed", "from", local.RemoteAddr().String(), "to", f.cfg.To, "bytes_up", up, "bytes_down", down, "duration", time.Since(start).Round(time.Millisecond))
}

// dial opens a CONNECT tunnel to cfg.To through the server.
func (f *Forwarder) dial(ctx context.Context) (net.Conn, *bufio.Reader, error) {
	ctx, cancel := context.WithTimeout(ctx, f.cfg.DialTimeout)
	defer cancel()
	addr := f.server.Host
	if f.server.Port() == "" {
		addr = net.JoinHostPort(f.server.Hostname(), map[string]string{"http": "80", "https": "443"}[f.server.Scheme])
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, nil, err
	}
	if f.server.Scheme == "https" {
		tc := tls.Client(conn, &tls.Config{ServerName: f.server.Hostname()})
		if err := tc.HandshakeContext(ctx); err != nil {
			conn.Close()
			return nil, nil, err
		}
		conn = tc
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()

	req := &http.Request{Method: http.MethodConnect, URL: &url.URL{Host: f.cfg.To}, Host: f.cfg.To, Header: http.Header{}}
	if f.cfg.Client != "" {
		req.Header.Set("X-Proxy-Client", f.cfg.Client)
	}
	if f.cfg.Auth != "" {
		req.Header.Set("Proxy-Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte(f.cfg.Auth)))
	}
	if err := req.Write(conn); err != nil {
		conn.Close()
		return nil, nil, err
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		conn.Close()
		return nil, nil, err
	}
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		conn.Close()
		return nil, nil, fmt.Errorf("server answered %s: %s", resp.Status, strings.TrimSpace(string(msg)))
	}
	if !stop() {
		conn.Close()
		return nil, nil, ctx.Err()
	}
	return conn, br, nil
}
