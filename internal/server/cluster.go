package server

import (
	"bufio"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"wsp/internal/cluster"
	"wsp/internal/httperr"
	"wsp/internal/tunnel"
)

// A node-to-node request carries these two headers: the name of the node
// that forwards it, and a signature of the request with the cluster secret
// (nodeMAC): the secret itself never travels, so a host that gets node
// requests (a wrong advertise URL, a forged directory entry) cannot learn
// it, and a signature it captured is good only for that request, for
// clusterAuthWindow. A node that receives a request with a good signature
// serves it from its own sessions only, never forwards it again (no
// loops), and trusts the app authentication the first node did.
// On the answer to a node request, X-Wsp-Cluster-Node names the node that
// wrote it when it is that node's own error (see markOwn), which no client
// or destination can fake: only then may the sending node try another.
// See docs/protocol.md, "Between server nodes".
const (
	headerClusterNode = "X-Wsp-Cluster-Node"
	headerClusterAuth = "X-Wsp-Cluster-Auth"
	// clusterAuthWindow is how far the time a node signed a request at may
	// be from the receiving node's clock.
	clusterAuthWindow = time.Minute
)

// nodeMAC is the signature of a node request: what it asks for (method,
// destination, client, request id), who asks and when, under the secret.
// None of the fields can hold a newline (header values, node names).
func nodeMAC(secret string, at int64, node, method, target, client, id string) string {
	m := hmac.New(sha256.New, []byte(secret))
	fmt.Fprintf(m, "wsp-node-v1\n%d\n%s\n%s\n%s\n%s\n%s", at, node, method, target, client, id)
	return hex.EncodeToString(m.Sum(nil))
}

// signNode sets the node headers on h, a request to another node for
// method on target; h already holds its client and request id.
func (s *Server) signNode(h http.Header, method, target string) {
	at := time.Now().Unix()
	h.Set(headerClusterNode, s.node)
	h.Set(headerClusterAuth, fmt.Sprintf("t=%d,mac=%s", at, nodeMAC(s.cluster.secret, at, s.node, method, target, h.Get(headerClient), h.Get(headerRequestID))))
}

// nodeTarget is what a node request asks for, as nodeMAC signs it.
func nodeTarget(r *http.Request) string {
	if r.Method == http.MethodConnect {
		return r.Host
	}
	return r.Header.Get(headerDestination)
}

// checkNodeAuth verifies the signature auth of a request from node.
func (s *Server) checkNodeAuth(r *http.Request, node, auth string) *httperr.Error {
	ts, mac, ok := strings.Cut(auth, ",")
	at, err := strconv.ParseInt(strings.TrimPrefix(ts, "t="), 10, 64)
	if !ok || err != nil || !strings.HasPrefix(ts, "t=") || !strings.HasPrefix(mac, "mac=") {
		return httperr.New(http.StatusBadRequest, httperr.BadRequest, "node-to-node request from node %q: malformed %s", node, headerClusterAuth)
	}
	if d := time.Since(time.Unix(at, 0)); d > clusterAuthWindow || d < -clusterAuthWindow {
		return httperr.New(http.StatusForbidden, httperr.Forbidden, "node-to-node request from node %q signed %s away from this node's clock (at most %s: do the nodes' clocks agree?)", node, d.Round(time.Second), clusterAuthWindow)
	}
	want := nodeMAC(s.cluster.secret, at, node, r.Method, nodeTarget(r), r.Header.Get(headerClient), r.Header.Get(headerRequestID))
	if !hmac.Equal([]byte(strings.TrimPrefix(mac, "mac=")), []byte(want)) {
		return httperr.New(http.StatusForbidden, httperr.Forbidden, "node-to-node request from node %q: wrong signature (cluster.secret differs between the nodes?)", node)
	}
	return nil
}

// forwardedHeaders are set by the node an app reached, as the destination
// must see them; a node serving a forwarded request keeps them.
var forwardedHeaders = []string{"X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto"}

const (
	// nodeDialTimeout bounds connecting to another node: an unreachable
	// holder costs a request at most this before the next one is tried.
	nodeDialTimeout = 2 * time.Second
	// withdrawTimeout bounds marking this node as draining in the
	// directory, and removing it at the end of the drain.
	withdrawTimeout = 3 * time.Second
)

// clusterNode is what a server with a Redis directory adds: the directory,
// and the HTTP client and reverse proxy that forward requests to the nodes
// holding their client.
type clusterNode struct {
	dir       *cluster.Directory
	secret    string
	transport *http.Transport // node-to-node HTTP/1.1 connections
	dialer    *net.Dialer
	tls       *tls.Config // for https:// advertised URLs
	proxy     *httputil.ReverseProxy
	// answerTimeout bounds the wait for another node's answer head once
	// the request is sent: the node waits up to timeout for a session,
	// then its client up to a minute for the destination (connect).
	answerTimeout time.Duration
	forwarded     atomic.Int64 // app requests forwarded to another node
	received      atomic.Int64 // node requests accepted from other nodes
}

// forwarding is the state of a request this node forwards.
type forwarding struct {
	nodes []cluster.Node // to try, in order
	// result: "ok" when a node answered (whatever it answered), else the
	// code of the failure on the hop; for wsp_cluster_forwarded_total.
	result string
}

// newCluster sets up the directory and the node-to-node client; nothing
// touches the network before Serve.
func (s *Server) newCluster() (*clusterNode, error) {
	cc := s.cfg.Cluster
	dir, err := cluster.New(cluster.Config{
		Redis:     cc.Redis,
		Node:      s.node,
		Advertise: strings.TrimSuffix(cc.Advertise, "/"),
		TTL:       cc.TTL.D(),
		Held:      s.reg.clientIDs,
		Log:       s.log,
	})
	if err != nil {
		return nil, err
	}
	ka := s.cfg.KeepAlive.D()
	c := &clusterNode{
		dir:           dir,
		secret:        cc.Secret,
		answerTimeout: s.cfg.Timeout.D() + connectAnswerTimeout,
		// A node that dies without a FIN is noticed within three keepalive
		// intervals, not the system's two hours.
		dialer: &net.Dialer{Timeout: nodeDialTimeout, KeepAliveConfig: net.KeepAliveConfig{Enable: true, Idle: ka, Interval: ka, Count: 2}},
		tls:    &tls.Config{MinVersion: tls.VersionTLS12, NextProtos: []string{"http/1.1"}},
	}
	if s.certs != nil {
		// Nodes that require client certificates (tls.clientca) accept
		// each other's when they share a certificate signed by that CA.
		c.tls.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return s.certs.current(), nil
		}
	}
	c.transport = &http.Transport{
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			return c.dial(ctx, addr, false)
		},
		DialTLSContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			return c.dial(ctx, addr, true)
		},
		// HTTP/1.1 only: upgrades and streaming bodies pass as they do
		// from apps. Idle connections are dropped before the other node's
		// http.Server would (2 minutes), so a reused one is rarely stale.
		TLSNextProto:           map[string]func(string, *tls.Conn) http.RoundTripper{},
		MaxIdleConnsPerHost:    64,
		IdleConnTimeout:        90 * time.Second,
		ResponseHeaderTimeout:  c.answerTimeout,
		DisableCompression:     true,
		MaxResponseHeaderBytes: 1 << 20,
		WriteBufferSize:        32 << 10,
		ReadBufferSize:         32 << 10,
	}
	c.proxy = s.newNodeProxy(c)
	s.metrics.Cluster(dir.Up, func() int { return dir.Status().Held }, dir.Errors)
	return c, nil
}

// current returns the certificate the server presents now.
func (c *certStore) current() *tls.Certificate {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.cert
}

// startCluster begins the directory's heartbeats.
func (s *Server) startCluster() {
	if s.cluster != nil {
		s.cluster.dir.Start()
		s.log.Info("cluster node", "node", s.node, "advertise", s.cfg.Cluster.Advertise, "redis", s.cluster.dir.Status().Redis, "ttl", s.cfg.Cluster.TTL.D())
	}
}

// drainCluster marks this node as draining in the directory, first thing
// in a drain: other nodes stop forwarding to it the requests another node
// can serve, at once rather than after the TTL, and still send it those
// for clients only it holds, which it serves until the drain ends.
func (s *Server) drainCluster() {
	if s.cluster == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), withdrawTimeout)
	defer cancel()
	if err := s.cluster.dir.Drain(ctx); err != nil {
		s.log.Warn("drain: could not mark this node as draining in the cluster directory; the next heartbeat will", "cause", err)
		return
	}
	s.log.Info("drain: marked this node as draining in the cluster directory", "node", s.node)
}

// withdraw removes this node from the directory once it serves no more
// requests: other nodes stop forwarding to it at once rather than after
// the TTL.
func (s *Server) withdraw() {
	if s.cluster == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), withdrawTimeout)
	defer cancel()
	if err := s.cluster.dir.Withdraw(ctx); err != nil {
		s.log.Warn("drain: could not remove this node from the cluster directory; its entries expire within the ttl", "ttl", s.cfg.Cluster.TTL.D(), "cause", err)
		return
	}
	s.log.Info("drain: removed this node from the cluster directory", "node", s.node)
}

// closeCluster stops the heartbeats and closes the connections to Redis
// and to other nodes.
func (s *Server) closeCluster() {
	if s.cluster != nil {
		s.cluster.dir.Close()
		s.cluster.transport.CloseIdleConnections()
	}
}

// clusterChanged tells the directory that the held client ids changed.
func (s *Server) clusterChanged() {
	if s.cluster != nil {
		s.cluster.dir.Changed()
	}
}

type viaKey struct{}

// viaOf returns the node that forwarded the request of ctx, "" for an app's.
func viaOf(ctx context.Context) string {
	v, _ := ctx.Value(viaKey{}).(string)
	return v
}

// fromNode checks the cluster headers of r, if any, and removes them
// (every value, whatever the first): it returns the name of the node that
// forwarded r ("" when r came from an app) or the refusal to answer. The
// signature is compared in constant time.
func (s *Server) fromNode(r *http.Request) (string, *httperr.Error) {
	name, auth := r.Header.Get(headerClusterNode), r.Header.Get(headerClusterAuth)
	r.Header.Del(headerClusterNode)
	r.Header.Del(headerClusterAuth)
	if name == "" && auth == "" {
		return "", nil
	}
	var e *httperr.Error
	switch {
	case s.cluster == nil:
		e = httperr.New(http.StatusForbidden, httperr.Forbidden, "a node-to-node request (%s), but this server is not a cluster node: cluster.redis is not set", headerClusterNode)
	case name == "":
		e = httperr.New(http.StatusBadRequest, httperr.BadRequest, "a node-to-node request without %s naming the node that sent it", headerClusterNode)
	case auth == "":
		e = httperr.New(http.StatusUnauthorized, httperr.Unauthorized, "node-to-node request from node %q without %s", name, headerClusterAuth)
	case !tunnel.ValidID(name):
		e = httperr.New(http.StatusBadRequest, httperr.BadRequest, "%s %q is not a valid node name", headerClusterNode, name)
	default:
		e = s.checkNodeAuth(r, name, auth)
	}
	if e != nil {
		s.metrics.Received("refused")
		s.log.Warn("node request refused", "remote", r.RemoteAddr, "status", e.Status, "cause", e.Msg)
		return "", e
	}
	s.metrics.Received("accepted")
	s.cluster.received.Add(1)
	return name, nil
}

// forwarded serves x through another node when this one is a cluster node,
// the request came from an app (a node's request is never forwarded
// again), no session here can serve it, and the directory names nodes that
// may. It reports whether it answered the app. Otherwise the request is
// served here as without a cluster, and its 503 says where wsp looked.
func (s *Server) forwarded(rec *recorder, r *http.Request, x *exchange) bool {
	c := s.cluster
	if c == nil || x.via != "" || s.reg.holds(x.want) {
		return false
	}
	var nodes []cluster.Node
	if id := x.want.clientID; id != "" {
		var err error
		if nodes, err = c.dir.Holders(r.Context(), id); err != nil {
			x.want.scope = " to this node, and the cluster directory could not be asked about the others"
			return false
		}
	} else {
		// Requests that name no client go to a node holding some client,
		// as known at the last heartbeat; its clients' rules decide.
		nodes = c.dir.NodesWithClients()
	}
	// Names and URLs come from Redis: a node name ends up in answers.
	nodes = slices.DeleteFunc(nodes, func(n cluster.Node) bool {
		_, err := nodeURL(n)
		return !tunnel.ValidID(n.Name) || err != nil
	})
	if len(nodes) == 0 {
		x.want.scope = " to any node"
		return false
	}
	// Spread the load over the holders; the next is tried when one is
	// unreachable.
	rand.Shuffle(len(nodes), func(i, j int) { nodes[i], nodes[j] = nodes[j], nodes[i] })
	x.fwd = &forwarding{nodes: nodes, result: "ok"}
	x.clientID = x.want.clientID
	c.forwarded.Add(1)
	if r.Method == http.MethodConnect {
		s.forwardConnect(rec, r, x)
	} else {
		// The end of the server's life cancels the request, which closes
		// the connection to the node, an upgraded one included.
		ctx, cancel := context.WithCancel(context.WithValue(r.Context(), exchangeKey{}, x))
		stop := context.AfterFunc(s.life, cancel)
		c.proxy.ServeHTTP(rec, r.WithContext(ctx))
		stop()
		cancel()
		if x.upgraded {
			s.tunnels.Done()
		}
	}
	s.metrics.Forwarded(x.fwd.result)
	return true
}

// newNodeProxy is the reverse proxy that forwards app requests to another
// node: as a /request with the destination and the client in X-Proxy-*
// headers, the app's X-Forwarded-* and X-Request-Id as this node set them,
// the cluster headers and a Via naming this node. Bodies stream both ways.
func (s *Server) newNodeProxy(c *clusterNode) *httputil.ReverseProxy {
	return &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			x := exchangeOf(pr.In.Context())
			pr.SetXForwarded()
			for name := range pr.Out.Header {
				if strings.HasPrefix(name, proxyHeaderPrefix) {
					delete(pr.Out.Header, name)
				}
			}
			h := pr.Out.Header
			h.Set(headerDestination, x.dest.String())
			if x.want.clientID != "" {
				h.Set(headerClient, x.want.clientID)
			}
			s.signNode(h, pr.Out.Method, x.dest.String())
			h.Add("Via", "1.1 "+s.node)
			pr.Out.URL = &url.URL{Path: "/request"} // nodeTransport adds each node's scheme and host
			pr.Out.Host = ""
		},
		Transport:     &nodeTransport{s: s, base: c.transport},
		FlushInterval: -1, // event streams and long polls pass as they come
		ModifyResponse: func(resp *http.Response) error {
			x := exchangeOf(resp.Request.Context())
			if x.bodyTooLarge.Load() {
				// The node saw a truncated body; its answer is moot.
				return errBodyTooLarge
			}
			if resp.StatusCode == http.StatusSwitchingProtocols {
				// The app's connection and the node's become a pipe
				// http.Server no longer tracks: Serve waits for it, and
				// the end of s.life closes it (see forwarded).
				if !s.enter(&s.tunnels) {
					return httperr.New(http.StatusServiceUnavailable, httperr.Draining, "server is shutting down")
				}
				x.upgraded = true
			}
			resp.Header.Add("Via", "1.1 "+x.node)
			noteAnswer(resp, x)
			return nil
		},
		ErrorLog:     s.proxy.ErrorLog,
		BufferPool:   copyBuffers,
		ErrorHandler: s.proxyError,
	}
}

// markOwn marks an error answer this node writes to a node request as its
// own (see headerClusterNode).
func (s *Server) markOwn(w http.ResponseWriter, x *exchange) {
	if x.via != "" {
		w.Header().Set(headerClusterNode, s.node)
	}
}

// nodeTransport sends a forwarded request to the nodes of its exchange in
// turn: the next is tried when one cannot be reached (nothing was sent),
// or, for a request without a body, when one answers that it no longer
// holds the client.
type nodeTransport struct {
	s    *Server
	base *http.Transport
}

func (t *nodeTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	x := exchangeOf(req.Context())
	hasBody := req.Body != nil && req.Body != http.NoBody
	nodes := x.fwd.nodes
	var failures []string
	for i, n := range nodes {
		u, err := nodeURL(n)
		if err != nil {
			failures = append(failures, err.Error())
			continue
		}
		out := req.Clone(req.Context())
		out.URL.Scheme, out.URL.Host, out.Host = u.Scheme, u.Host, u.Host
		if hasBody {
			// A failed attempt must not close the app's body, which the
			// next attempt sends; http.Server closes it in the end.
			out.Body = noClose{req.Body}
		}
		x.node = n.Name
		resp, err := t.base.RoundTrip(out)
		if err != nil {
			if cerr := req.Context().Err(); cerr != nil {
				return nil, cerr
			}
			if notConnected(err) {
				t.s.metrics.NodeFailure()
				failures = append(failures, fmt.Sprintf("%s: %v", n.Name, err))
				continue
			}
			if isTimeout(err) {
				// The node has the request and may have run it: no other
				// node gets it.
				return nil, httperr.Wrap(err, http.StatusGatewayTimeout, httperr.NodeUnreachable, "node %q took the request and did not answer within %s", n.Name, t.s.cluster.answerTimeout)
			}
			return nil, httperr.Wrap(err, http.StatusBadGateway, httperr.TunnelBroken, "the exchange with node %q broke", n.Name)
		}
		if i < len(nodes)-1 && !hasBody && notHeld(resp, x, n) {
			// The directory was behind: that node lost the client since
			// (or, for any client, its clients refuse); the next may not.
			resp.Body.Close()
			failures = append(failures, fmt.Sprintf("%s: answered %d %s", n.Name, resp.StatusCode, resp.Header.Get(httperr.Header)))
			continue
		}
		return resp, nil
	}
	x.node = ""
	return nil, unreachable(x, failures)
}

// noClose is a request body a failed attempt may not close.
type noClose struct{ io.Reader }

func (noClose) Close() error { return nil }

// nodeURL parses a node's advertised URL as the directory holds it.
func nodeURL(n cluster.Node) (*url.URL, error) {
	u, err := url.Parse(n.URL)
	if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
		return nil, fmt.Errorf("%s: advertised URL %q is not http(s)://host:port", n.Name, n.URL)
	}
	return u, nil
}

// dialError is a failure to connect to a node: nothing reached it.
type dialError struct{ error }

func (e dialError) Unwrap() error { return e.error }

// notConnected reports whether err happened before a connection to the
// node existed, so that no byte of the request can have reached it.
func notConnected(err error) bool {
	var de dialError
	return errors.As(err, &de)
}

// isTimeout reports whether err is a deadline or timeout.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())
}

// notHeld reports whether node n's answer says it cannot serve the request
// though the directory said it might: it holds no such client (any more),
// or, for a request naming no client, its clients refuse it. Only n's own
// answer counts (markOwn): the same code from a client or destination
// says the request may have run.
func notHeld(resp *http.Response, x *exchange, n cluster.Node) bool {
	if resp.Header.Get(headerClusterNode) != n.Name {
		return false
	}
	code := resp.Header.Get(httperr.Header)
	return (resp.StatusCode == http.StatusServiceUnavailable && code == httperr.NoClient) ||
		(x.want.clientID == "" && resp.StatusCode == http.StatusForbidden && code == httperr.ClientRefused)
}

// unreachable is the answer when no node the directory named could serve:
// nothing was sent, or only to nodes that could not serve, so the app may
// try again (503, Retry-After).
func unreachable(x *exchange, failures []string) *httperr.Error {
	who := "clients are held by"
	if id := x.want.clientID; id != "" {
		who = "client " + strconv.Quote(id) + " is held by"
	}
	return httperr.New(http.StatusServiceUnavailable, httperr.NodeUnreachable, "%s %d other node(s) per the cluster directory, but none could serve the request: %s",
		who, len(x.fwd.nodes), strings.Join(failures, "; "))
}

// failForward answers the app with e, the failure on the hop.
func failForward(rec *recorder, x *exchange, e *httperr.Error) {
	x.err = e
	x.fwd.result = e.Code
	httperr.Write(rec, e)
}

// forwardConnect opens x's CONNECT tunnel through a node holding its
// client: a CONNECT to that node with the cluster headers, then the app's
// connection and the node's are joined.
func (s *Server) forwardConnect(rec *recorder, r *http.Request, x *exchange) {
	nodes := x.fwd.nodes
	var failures []string
	for i, n := range nodes {
		x.node = n.Name
		failure, answered := s.connectThrough(rec, r, x, n, i == len(nodes)-1)
		if answered {
			return
		}
		failures = append(failures, failure)
	}
	x.node = ""
	failForward(rec, x, unreachable(x, failures))
}

// connectThrough tries x's CONNECT through node n. It reports whether the
// app was answered (or went away); if not, why n could not serve it, and
// the next node may be tried: nothing reached n, or n answered that it
// cannot serve it (last: there is no next node).
func (s *Server) connectThrough(rec *recorder, r *http.Request, x *exchange, n cluster.Node, last bool) (string, bool) {
	conn, err := s.dialNode(r.Context(), n)
	if err != nil {
		if r.Context().Err() != nil {
			appGone(x, err)
			return "", true
		}
		s.metrics.NodeFailure()
		return err.Error(), false
	}
	// The end of the server's life closes the tunnel, as the end of a
	// session closes those through a client.
	stop := context.AfterFunc(s.life, func() { conn.Close() })
	defer func() {
		stop()
		conn.Close()
	}()
	br, resp, err := s.askNodeConnect(r.Context(), conn, x, r)
	switch {
	case r.Context().Err() != nil:
		if err == nil {
			resp.Body.Close()
		}
		appGone(x, r.Context().Err())
		return "", true
	case err != nil && isTimeout(err):
		failForward(rec, x, httperr.Wrap(err, http.StatusGatewayTimeout, httperr.NodeUnreachable, "node %q took the CONNECT and did not answer within %s", n.Name, s.cluster.answerTimeout))
		return "", true
	case err != nil:
		failForward(rec, x, httperr.Wrap(err, http.StatusBadGateway, httperr.TunnelBroken, "CONNECT through node %q failed", n.Name))
		return "", true
	}
	if resp.StatusCode != http.StatusOK {
		if !last && notHeld(resp, x, n) {
			resp.Body.Close()
			return fmt.Sprintf("%s: answered %d %s", n.Name, resp.StatusCode, resp.Header.Get(httperr.Header)), false
		}
		if code := resp.Header.Get(httperr.Header); code != "" {
			x.err = clientError(resp, code)
		}
		resp.Header.Add("Via", "1.1 "+n.Name)
		relayAnswer(rec, resp)
		return "", true
	}
	s.splice(rec, x, tunnel.End{Conn: conn, Reader: br})
	if x.err != nil { // splice refused: draining
		x.fwd.result = x.err.Code
	}
	return "", true
}

// appGone records that the app went away before it was answered.
func appGone(x *exchange, err error) {
	x.err = httperr.Wrap(err, httperr.StatusAppGone, httperr.AppGone, "the app went away")
	if x.fwd != nil {
		x.fwd.result = x.err.Code
	}
}

// dialNode connects to a node's advertised address, with TLS for https.
func (s *Server) dialNode(ctx context.Context, n cluster.Node) (net.Conn, error) {
	u, err := nodeURL(n)
	if err != nil {
		return nil, err
	}
	host := u.Host
	if u.Port() == "" {
		host = net.JoinHostPort(u.Hostname(), map[string]string{"http": "80", "https": "443"}[u.Scheme])
	}
	conn, err := s.cluster.dial(ctx, host, u.Scheme == "https")
	if err != nil {
		return nil, fmt.Errorf("%s: %w", n.Name, err)
	}
	return conn, nil
}

// dial connects to a node at addr (host:port), with TLS when useTLS, each
// step bounded by nodeDialTimeout. Its failures are dialErrors: nothing
// of a request can have reached the node.
func (c *clusterNode) dial(ctx context.Context, addr string, useTLS bool) (net.Conn, error) {
	conn, err := c.dialer.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, dialError{err}
	}
	if !useTLS {
		return conn, nil
	}
	host, _, _ := net.SplitHostPort(addr)
	cfg := c.tls.Clone()
	cfg.ServerName = host
	tc := tls.Client(conn, cfg)
	hctx, cancel := context.WithTimeout(ctx, nodeDialTimeout)
	defer cancel()
	if err := tc.HandshakeContext(hctx); err != nil {
		conn.Close()
		return nil, dialError{fmt.Errorf("TLS handshake: %w", err)}
	}
	return tc, nil
}

// askNodeConnect sends x's CONNECT to a node on conn and reads its answer; the
// reader holds what the node sent after the answer's head.
func (s *Server) askNodeConnect(ctx context.Context, conn net.Conn, x *exchange, r *http.Request) (*bufio.Reader, *http.Response, error) {
	h := http.Header{}
	h.Set(headerRequestID, x.id)
	if x.want.clientID != "" {
		h.Set(headerClient, x.want.clientID)
	}
	s.signNode(h, http.MethodConnect, x.dest.Host)
	h["Via"] = append(r.Header.Values("Via"), "1.1 "+s.node)
	// The node answers once its client has dialled; the app going away
	// ends the wait.
	conn.SetDeadline(time.Now().Add(s.cluster.answerTimeout))
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()
	br, resp, err := askConnect(conn, x.dest.Host, h)
	if err != nil {
		return nil, nil, err
	}
	if !stop() {
		resp.Body.Close()
		return nil, nil, ctx.Err()
	}
	conn.SetDeadline(time.Time{})
	return br, resp, nil
}

// ClusterStats is the directory as this node sees it, and its forwarding
// counters, for /api/stats.
type ClusterStats struct {
	cluster.Status
	Forwarded int64 `json:"forwarded_total"` // app requests forwarded to other nodes
	Received  int64 `json:"received_total"`  // node requests accepted from other nodes
}

func (s *Server) clusterStats() *ClusterStats {
	if s.cluster == nil {
		return nil
	}
	return &ClusterStats{Status: s.cluster.dir.Status(), Forwarded: s.cluster.forwarded.Load(), Received: s.cluster.received.Load()}
}
