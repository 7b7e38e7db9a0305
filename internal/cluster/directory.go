// Package cluster is the Redis directory of several wsp server nodes: which
// node holds sessions of which client id, so that a node receiving a request
// for a client it does not hold can forward it to one that does.
//
// The data model in Redis (every key under the prefix "wsp:"):
//
//	wsp:client:<id>  sorted set: member = node name, score = when the entry
//	                 expires (Unix ms); the key itself expires after the TTL
//	                 (garbage collection only: lookups go by the score)
//	wsp:node:<name>  hash {url, clients, draining}: the node's advertised
//	                 URL, how many client ids it holds, and 1 while it
//	                 drains; expires after the TTL
//	wsp:nodes        sorted set: member = node name, score = expiry (Unix ms)
//
// A node writes its entries at every heartbeat (every third of the TTL) and
// at once when it gains or loses a client id; a heartbeat rewrites every
// entry, so a Redis that restarted empty is whole again one heartbeat later.
// An entry of a node that stops heartbeating is ignored once its score is
// past, and its keys expire. Lookups read the live holders of an id and
// their URLs in one round trip (a Lua script), so a node that withdrew
// (deleted wsp:node:<name>) is never returned, even if an entry lingers. A
// draining node is returned only for the ids no other node holds: it still
// serves them until its drain ends, and then withdraws.
package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"

	"wsp/internal/config"
)

// Bounds on every Redis call: a Redis that is down or black-holed costs a
// request at most LookupTimeout, a heartbeat at most callTimeout.
const (
	// LookupTimeout bounds the lookup a request waits for.
	LookupTimeout = time.Second
	callTimeout   = 3 * time.Second
	dialTimeout   = 2 * time.Second
	// batch bounds the commands of one heartbeat pipeline (two per id).
	batch = 500
	// minRetry is the first retry delay after a failed heartbeat; it
	// doubles up to the heartbeat period.
	minRetry = 250 * time.Millisecond
)

const (
	prefix   = "wsp:"
	nodesKey = prefix + "nodes"
)

func clientKey(id string) string    { return prefix + "client:" + id }
func nodeKey(name string) string    { return prefix + "node:" + name }
func expiry(t time.Time) float64    { return float64(t.UnixMilli()) }
func scoreAfter(t time.Time) string { return "(" + strconv.FormatInt(t.UnixMilli(), 10) }

// holders returns, for KEYS[1] = wsp:client:<id>, the names and URLs of the
// nodes other than ARGV[3] whose entry expires after ARGV[1] and whose node
// hash (ARGV[2] .. name) still exists: {name1, url1, name2, url2, ...}. The
// draining ones only when there is no other.
var holders = redis.NewScript(`
local names = redis.call('ZRANGE', KEYS[1], ARGV[1], '+inf', 'BYSCORE')
local out, draining = {}, {}
for _, name in ipairs(names) do
  if name ~= ARGV[3] then
    local h = redis.call('HMGET', ARGV[2] .. name, 'url', 'draining')
    if h[1] then
      local list = out
      if h[2] == '1' then list = draining end
      list[#list + 1] = name
      list[#list + 1] = h[1]
    end
  end
end
if #out == 0 then return draining end
return out
`)

// Config says which node this is and where its directory lives.
type Config struct {
	Redis     string        // redis:// or rediss:// URL
	Node      string        // this node's name
	Advertise string        // the URL other nodes reach this one at
	TTL       time.Duration // an entry lives this long after its last heartbeat
	// Held returns the client ids this node holds sessions of, now. The
	// directory calls it at every heartbeat and after Changed.
	Held func() []string
	Log  *slog.Logger
	Now  func() time.Time // nil: time.Now
}

// Node is a server node as the directory knows it.
type Node struct {
	Name    string `json:"name"`
	URL     string `json:"url"`
	Clients int    `json:"clients"` // client ids it holds, at its last heartbeat
	// Draining: the node is shutting down; it is sent requests only for
	// clients no other node holds.
	Draining bool `json:"draining,omitempty"`
}

// Status is the directory as this node sees it, for /api/stats.
type Status struct {
	Node          string    `json:"node"`
	Advertise     string    `json:"advertise"`
	Redis         string    `json:"redis"` // without its password
	Up            bool      `json:"up"`    // the last Redis call succeeded
	Error         string    `json:"error,omitempty"`
	Errors        int64     `json:"errors_total"` // failed Redis calls
	LastHeartbeat time.Time `json:"last_heartbeat"`
	Held          int       `json:"held"`  // client ids recorded for this node
	Nodes         []Node    `json:"nodes"` // live nodes at the last heartbeat, this one included
	Draining      bool      `json:"draining"`
	Withdrawn     bool      `json:"withdrawn"`
}

// Directory records this node's client ids in Redis and looks up the nodes
// holding others. Create it with New, start its heartbeats with Start, mark
// the node with Drain when its drain begins, and end with Withdraw (when it
// serves no more) and Close.
type Directory struct {
	cfg      Config
	redis    string // redacted URL, for logs
	rdb      *redis.Client
	kick     chan struct{} // Changed's wake-up call to the heartbeat goroutine
	errors   atomic.Int64
	draining atomic.Bool // set by Drain, written at every heartbeat
	rewrite  atomic.Bool // the next sync rewrites everything (after Drain)

	runMu  sync.Mutex
	cancel context.CancelFunc // guarded by runMu: stops the heartbeats; nil when not running
	done   chan struct{}      // guarded by runMu: closed when the heartbeat goroutine ends

	// written holds the ids the last successful sync recorded: written
	// by the heartbeat goroutine only, under mu; read by it, and by
	// Withdraw under mu.
	written map[string]bool

	mu        sync.Mutex
	up        bool      // guarded by mu
	lastErr   string    // guarded by mu: the cause last logged, "" when up
	lastBeat  time.Time // guarded by mu
	held      int       // guarded by mu
	nodes     []Node    // guarded by mu
	withdrawn bool      // guarded by mu
}

// New checks cfg and returns a Directory; it does not touch the network.
func New(cfg Config) (*Directory, error) {
	opts, err := redis.ParseURL(cfg.Redis)
	if err != nil {
		return nil, fmt.Errorf("cluster.redis: %w", err)
	}
	switch {
	case cfg.Node == "":
		return nil, errors.New("cluster: missing node name")
	case cfg.Advertise == "":
		return nil, errors.New("cluster.advertise: missing")
	case cfg.TTL < time.Second:
		return nil, fmt.Errorf("cluster.ttl: must be at least 1s, got %s", cfg.TTL)
	case cfg.Held == nil:
		return nil, errors.New("cluster: missing Held")
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	// Fail fast and let the heartbeat retry, rather than have the library
	// retry inside one call; no background work of the library's own.
	opts.Protocol = 2
	opts.DisableIdentity = true
	opts.MaxRetries = -1
	opts.DialTimeout = dialTimeout
	opts.DialerRetries = 1
	opts.ReadTimeout = callTimeout
	opts.WriteTimeout = callTimeout
	opts.ContextTimeoutEnabled = true
	opts.MaintNotificationsConfig = &maintnotifications.Config{Mode: maintnotifications.ModeDisabled}
	return &Directory{
		cfg:     cfg,
		redis:   config.RedactURL(cfg.Redis),
		rdb:     redis.NewClient(opts),
		kick:    make(chan struct{}, 1),
		written: map[string]bool{},
	}, nil
}

// redactURL hides a password in u.
// Period is the heartbeat period: a third of the TTL.
func (d *Directory) Period() time.Duration { return d.cfg.TTL / 3 }

// Start begins the heartbeats: one now, then every Period, and a sync
// after each Changed. Withdraw or Close stops them.
func (d *Directory) Start() {
	d.runMu.Lock()
	defer d.runMu.Unlock()
	if d.cancel != nil {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	d.cancel, d.done = cancel, make(chan struct{})
	go d.run(ctx, d.done)
}

// halt ends the heartbeats without waiting for the goroutine, whose Redis
// call in flight may outlast the cancel by up to callTimeout; it returns
// the channel closed when the goroutine is over (nil if none ever ran).
func (d *Directory) halt() chan struct{} {
	d.runMu.Lock()
	defer d.runMu.Unlock()
	if d.cancel != nil {
		d.cancel()
		d.cancel = nil
	}
	return d.done
}

// stop ends the heartbeats and waits for the goroutine; idempotent.
func (d *Directory) stop() {
	if done := d.halt(); done != nil {
		<-done
	}
}

// Changed tells the directory that the set of held ids changed (a first
// session of an id arrived, or the last one left): it syncs at once. It
// never blocks.
func (d *Directory) Changed() {
	select {
	case d.kick <- struct{}{}:
	default:
	}
}

func (d *Directory) run(ctx context.Context, done chan struct{}) {
	defer close(done)
	period := d.Period()
	next := time.Now() // the next full heartbeat
	retry := time.Duration(0)
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		t.Reset(max(time.Until(next), 0))
		select {
		case <-ctx.Done():
			return
		case <-d.kick:
		case <-t.C:
		}
		full := !time.Now().Before(next) || d.rewrite.Swap(false)
		wrote, err := d.sync(ctx, full)
		if ctx.Err() != nil {
			return
		}
		if wrote || err != nil {
			d.report("heartbeat", err)
		}
		switch {
		case err != nil:
			// The next attempt rewrites everything, as after a restart
			// of Redis.
			retry = min(max(2*retry, minRetry), period)
			next = time.Now().Add(retry)
		case full:
			retry = 0
			next = time.Now().Add(period)
		}
	}
}

// sync records the held ids: every one of them and the node's own entry on
// a full heartbeat, else only the ids gained and lost since the last sync.
// wrote is false when there was nothing to do.
func (d *Directory) sync(ctx context.Context, full bool) (wrote bool, err error) {
	now := d.cfg.Now()
	exp := expiry(now.Add(d.cfg.TTL))
	held := d.cfg.Held()
	current := make(map[string]bool, len(held))
	for _, id := range held {
		current[id] = true
	}
	var add, gone []string
	for id := range current {
		if full || !d.written[id] {
			add = append(add, id)
		}
	}
	for id := range d.written {
		if !current[id] {
			gone = append(gone, id)
		}
	}
	if !full && len(add) == 0 && len(gone) == 0 {
		return false, nil
	}
	node, ttl := d.cfg.Node, d.cfg.TTL
	// The node entry first: a holder is only found while its hash exists.
	if err := d.pipe(ctx, func(p redis.Pipeliner) {
		p.HSet(ctx, nodeKey(node), "url", d.cfg.Advertise, "clients", len(current), "draining", flag(d.draining.Load()))
		p.PExpire(ctx, nodeKey(node), ttl)
		p.ZAdd(ctx, nodesKey, redis.Z{Score: exp, Member: node})
		p.ZRemRangeByScore(ctx, nodesKey, "-inf", strconv.FormatInt(now.UnixMilli(), 10))
		p.PExpire(ctx, nodesKey, ttl)
	}); err != nil {
		return true, err
	}
	for chunk := range slices.Chunk(add, batch) {
		if err := d.pipe(ctx, func(p redis.Pipeliner) {
			for _, id := range chunk {
				p.ZAdd(ctx, clientKey(id), redis.Z{Score: exp, Member: node})
				p.PExpire(ctx, clientKey(id), ttl)
			}
		}); err != nil {
			return true, err
		}
	}
	for chunk := range slices.Chunk(gone, batch) {
		if err := d.pipe(ctx, func(p redis.Pipeliner) {
			for _, id := range chunk {
				p.ZRem(ctx, clientKey(id), node)
			}
		}); err != nil {
			return true, err
		}
	}
	var nodes []Node
	if full {
		if nodes, err = d.liveNodes(ctx, now); err != nil {
			d.mu.Lock()
			d.written = current
			d.mu.Unlock()
			return true, err
		}
	}
	d.mu.Lock()
	d.written = current
	d.lastBeat, d.held = now, len(current)
	if full {
		d.nodes = nodes
	}
	d.mu.Unlock()
	return true, nil
}

// pipe runs the commands fill queues as one pipeline, bounded by callTimeout.
func (d *Directory) pipe(ctx context.Context, fill func(redis.Pipeliner)) error {
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	p := d.rdb.Pipeline()
	fill(p)
	_, err := p.Exec(ctx)
	return err
}

// liveNodes reads every node whose heartbeat is recent.
func (d *Directory) liveNodes(ctx context.Context, now time.Time) ([]Node, error) {
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	names, err := d.rdb.ZRangeArgs(ctx, redis.ZRangeArgs{Key: nodesKey, Start: scoreAfter(now), Stop: "+inf", ByScore: true}).Result()
	if err != nil {
		return nil, err
	}
	p := d.rdb.Pipeline()
	cmds := make([]*redis.MapStringStringCmd, len(names))
	for i, n := range names {
		cmds[i] = p.HGetAll(ctx, nodeKey(n))
	}
	if len(names) > 0 {
		if _, err := p.Exec(ctx); err != nil {
			return nil, err
		}
	}
	nodes := make([]Node, 0, len(names))
	for i, n := range names {
		h := cmds[i].Val()
		if h["url"] == "" {
			continue // withdrawn, or expired since
		}
		clients, _ := strconv.Atoi(h["clients"])
		nodes = append(nodes, Node{Name: n, URL: h["url"], Clients: clients, Draining: h["draining"] == "1"})
	}
	return nodes, nil
}

// Holders returns the live nodes other than this one that hold sessions of
// client id, within LookupTimeout.
func (d *Directory) Holders(ctx context.Context, id string) ([]Node, error) {
	lctx, cancel := context.WithTimeout(ctx, LookupTimeout)
	defer cancel()
	res, err := holders.Run(lctx, d.rdb, []string{clientKey(id)}, scoreAfter(d.cfg.Now()), prefix+"node:", d.cfg.Node).StringSlice()
	if err != nil {
		if ctx.Err() == nil { // not the caller giving up
			d.report("lookup", err)
		}
		return nil, fmt.Errorf("directory lookup of client %q in %s: %w", id, d.redis, err)
	}
	d.report("lookup", nil)
	var out []Node
	for i := 0; i+1 < len(res); i += 2 {
		out = append(out, Node{Name: res[i], URL: res[i+1]})
	}
	return out, nil
}

// NodesWithClients returns the live nodes other than this one that held
// at least one client id at the last heartbeat (no round trip to Redis),
// draining ones only when no other does. The list is dropped once the
// last successful heartbeat is older than the TTL: the nodes may be gone.
func (d *Directory) NodesWithClients() []Node {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cfg.Now().Sub(d.lastBeat) > d.cfg.TTL {
		return nil
	}
	var out, draining []Node
	for _, n := range d.nodes {
		switch {
		case n.Name == d.cfg.Node || n.Clients == 0:
		case n.Draining:
			draining = append(draining, n)
		default:
			out = append(out, n)
		}
	}
	if len(out) == 0 {
		return draining
	}
	return out
}

// Drain marks this node as draining, first thing in its drain: other nodes
// stop forwarding to it requests for the clients another node holds, at
// once rather than after the TTL, and go on forwarding it the others,
// which it still serves. The heartbeats go on, keeping the mark, until
// Withdraw.
func (d *Directory) Drain(ctx context.Context) error {
	d.draining.Store(true)
	// A heartbeat in flight may write the node's hash without the mark
	// after this call: the next one, right away, writes it again.
	d.rewrite.Store(true)
	defer d.Changed()
	node := d.cfg.Node
	err := d.pipe(ctx, func(p redis.Pipeliner) {
		p.HSet(ctx, nodeKey(node), "draining", flag(true))
		p.PExpire(ctx, nodeKey(node), d.cfg.TTL)
	})
	if err != nil {
		d.errors.Add(1)
		return fmt.Errorf("mark node %q as draining in the directory %s: %w", node, d.redis, err)
	}
	return nil
}

// Withdraw stops the heartbeats and removes every entry of this node at
// once, so other nodes stop forwarding to it (when it serves no more). The
// node's sessions are not touched. Entries it fails to remove expire
// within the TTL. It returns when ctx ends at the latest: it does not wait
// for a heartbeat in flight before removing the entries, and removes them
// again once that heartbeat is over, since it may have written them.
func (d *Directory) Withdraw(ctx context.Context) error {
	done := d.halt()
	inFlight := false // the heartbeat goroutine may be writing
	if done != nil {
		select {
		case <-done:
		default:
			inFlight = true
		}
	}
	d.mu.Lock()
	d.withdrawn = true
	ids := slices.Collect(maps.Keys(d.written))
	d.mu.Unlock()
	ids = append(ids, d.cfg.Held()...)
	slices.Sort(ids)
	ids = slices.Compact(ids)
	err := d.remove(ctx, ids)
	if err == nil && inFlight {
		select {
		case <-done:
			err = d.remove(ctx, ids)
		case <-ctx.Done():
			err = fmt.Errorf("a heartbeat still in flight may write the entries again: %w", ctx.Err())
		}
	}
	if err != nil {
		d.errors.Add(1)
		return fmt.Errorf("withdraw node %q from the directory %s: %w", d.cfg.Node, d.redis, err)
	}
	return nil
}

// remove deletes this node's entries: its hash, its place in the node
// list, and its entries for ids.
func (d *Directory) remove(ctx context.Context, ids []string) error {
	node := d.cfg.Node
	return d.pipe(ctx, func(p redis.Pipeliner) {
		p.Del(ctx, nodeKey(node))
		p.ZRem(ctx, nodesKey, node)
		for _, id := range ids {
			p.ZRem(ctx, clientKey(id), node)
		}
	})
}

// flag is how the directory writes a boolean.
func flag(b bool) int {
	if b {
		return 1
	}
	return 0
}

// Close stops the heartbeats, if running, and closes the connections to
// Redis. It does not remove entries (see Withdraw).
func (d *Directory) Close() error {
	d.stop()
	return d.rdb.Close()
}

// report notes the outcome of a Redis call and logs a failure once per
// distinct cause, and the recovery once.
func (d *Directory) report(op string, err error) {
	d.mu.Lock()
	if err == nil {
		recovered := d.lastErr != ""
		d.up, d.lastErr = true, ""
		d.mu.Unlock()
		if recovered {
			d.cfg.Log.Info("cluster directory reachable again", "redis", d.redis)
		}
		return
	}
	d.errors.Add(1)
	cause := err.Error()
	first := cause != d.lastErr
	d.up, d.lastErr = false, cause
	d.mu.Unlock()
	if first {
		d.cfg.Log.Warn("cluster directory unreachable: serving local sessions only, retrying", "redis", d.redis, "op", op, "cause", cause)
	}
}

// Status returns what the directory knows, for /api/stats.
func (d *Directory) Status() Status {
	d.mu.Lock()
	defer d.mu.Unlock()
	return Status{
		Node:          d.cfg.Node,
		Advertise:     d.cfg.Advertise,
		Redis:         d.redis,
		Up:            d.up,
		Error:         d.lastErr,
		Errors:        d.errors.Load(),
		LastHeartbeat: d.lastBeat,
		Held:          d.held,
		Nodes:         append([]Node{}, d.nodes...),
		Draining:      d.draining.Load(),
		Withdrawn:     d.withdrawn,
	}
}

// Up reports whether the last Redis call succeeded.
func (d *Directory) Up() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.up
}

// Errors counts the Redis calls that failed.
func (d *Directory) Errors() int64 { return d.errors.Load() }

// RouteLibraryLog sends the Redis library's own messages (one per failed
// dial, among others) to log at debug level: the directory already logs
// each distinct failure once. The library's logger is process-wide, so
// main calls this once.
func RouteLibraryLog(log *slog.Logger) { redis.SetLogger(libraryLog{log}) }

type libraryLog struct{ log *slog.Logger }

func (l libraryLog) Printf(ctx context.Context, format string, v ...any) {
	l.log.DebugContext(ctx, fmt.Sprintf(format, v...), "component", "redis")
}
