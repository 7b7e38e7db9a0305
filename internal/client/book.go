package client

import (
	"context"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"wsp/internal/tunnel"
)

// The bookkeeping of a target's sessions: which addresses and nodes they
// hold, and what discovery and the servers' node count ask for. Pure: the
// targetGroup (discovery.go) does the network and the locking.

// answer is what a server's 101 says about the session and itself.
type answer struct {
	session string // X-Wsp-Session
	node    string // X-Wsp-Node; "" from a server that does not name itself
	nodes   int    // X-Wsp-Nodes, at most maxNodesHint; 0 when absent or invalid
}

// parseAnswer reads the headers of a server's 101.
func parseAnswer(h http.Header) answer {
	a := answer{session: h.Get(tunnel.HeaderSession), node: h.Get(tunnel.HeaderNode)}
	if len(a.node) > maxNodeName {
		a.node = a.node[:maxNodeName]
	}
	if n, err := strconv.Atoi(strings.TrimSpace(h.Get(tunnel.HeaderNodes))); err == nil && n > 0 {
		a.nodes = min(n, maxNodesHint)
	}
	return a
}

// slot is one session a group keeps up: to one address, or (extra) through
// the group's addresses in turn. addr, extra and stop are set before its
// goroutine starts; the other fields are guarded by the group's mu.
type slot struct {
	addr  string                  // the address dialed; "" = the target's host as given; unused by extras
	extra bool                    // opened to reach the servers' node count
	stop  context.CancelCauseFunc // retires the slot: its session drains, then its goroutine ends

	retired bool      // stopped: not counted any more; its session, if up, drains
	turn    int       // extras: which address to dial through next
	live    bool      // a session is up
	via     string    // the address of the live session, or of the last attempt
	node    string    // the node the live session landed on
	nodes   int       // the node count that node reported
	session string    // the live session's id
	since   time.Time // when the live session came up
	lastErr string    // why the last attempt or session ended
}

// book is a target's slots and the nodes their sessions landed on: the
// decisions of discovery and of the node count hint, apart from the
// network. Not safe for concurrent use: the group's mu guards it.
type book struct {
	slots []*slot // in creation order; retired ones until their goroutine ends
	// hint is the node count the servers report: the largest among the
	// live sessions, or the last known one while none is up.
	hint int
}

// active calls f for each slot not retired.
func (b *book) active(f func(*slot)) {
	for _, s := range b.slots {
		if !s.retired {
			f(s)
		}
	}
}

// addresses returns the addresses of the active address slots, sorted.
func (b *book) addresses() []string {
	var addrs []string
	b.active(func(s *slot) {
		if !s.extra {
			addrs = append(addrs, s.addr)
		}
	})
	slices.Sort(addrs)
	return addrs
}

// syncAddrs makes the address slots follow addrs: it adds a slot for each
// new address and retires the slots of vanished ones, and extras whose
// session went through a vanished address (they dial again through one
// that is left, if still needed).
func (b *book) syncAddrs(addrs []string) (added, retire []*slot) {
	want := make(map[string]bool, len(addrs))
	for _, a := range addrs {
		want[a] = true
	}
	have := map[string]bool{}
	for _, s := range b.slots {
		if s.retired {
			continue
		}
		switch {
		case !s.extra && !want[s.addr]:
			s.retired = true
			retire = append(retire, s)
		case !s.extra:
			have[s.addr] = true
		case s.live && !want[s.via]:
			s.retired = true
			retire = append(retire, s)
		}
	}
	for _, a := range addrs {
		if !have[a] {
			have[a] = true
			s := &slot{addr: a}
			b.slots = append(b.slots, s)
			added = append(added, s)
		}
	}
	if len(retire) > 0 {
		b.updateHint()
	}
	return added, retire
}

// planExtras says which extra slots to add, or to retire, so that address
// slots and extras together are as many as the servers' node count, never
// more: extras only make up for address slots a load balancer hides.
func (b *book) planExtras() (added, retire []*slot) {
	var addrSlots int
	var extras []*slot
	b.active(func(s *slot) {
		if s.extra {
			extras = append(extras, s)
		} else {
			addrSlots++
		}
	})
	want := 0
	if b.hint > 0 {
		want = max(0, b.hint-addrSlots)
	}
	for range want - len(extras) {
		s := &slot{extra: true}
		b.slots = append(b.slots, s)
		added = append(added, s)
	}
	if surplus := len(extras) - want; surplus > 0 {
		// Retire the ones without a session first, newest first.
		var order []*slot
		for _, live := range []bool{false, true} {
			for i := len(extras) - 1; i >= 0; i-- {
				if extras[i].live == live {
					order = append(order, extras[i])
				}
			}
		}
		for _, s := range order[:surplus] {
			s.retired = true
			retire = append(retire, s)
		}
	}
	return added, retire
}

// via is the address s dials next: its own, or for an extra the group's
// addresses in turn.
func (b *book) via(s *slot) string {
	if !s.extra {
		s.via = s.addr
		return s.via
	}
	addrs := b.addresses()
	if len(addrs) == 0 {
		return ""
	}
	s.via = addrs[s.turn%len(addrs)]
	s.turn++
	return s.via
}

// verdict is what admit decides about a new session.
type verdict int

const (
	keep      verdict = iota // s is live
	duplicate                // landed on a node the target holds while another is missing: close it, retry later
	unwanted                 // s was retired meanwhile: close it, stop
)

// admit decides on a session of s that went through via and landed on
// a.node. It is a duplicate when the servers gave a node count, another
// session of the target holds that node, and some node is still missing:
// the slot closes it and tries again, to land elsewhere. Once every node
// is held, a session on a held node is kept: retrying cannot do better
// (more addresses than nodes, as with a load balancer's several addresses
// or a node's IPv4 and IPv6 ones).
func (b *book) admit(s *slot, via string, a answer) verdict {
	s.via = via
	if s.retired {
		return unwanted
	}
	if hint := max(b.hint, a.nodes); hint > 0 && a.node != "" {
		held := map[string]bool{}
		b.active(func(o *slot) {
			if o != s && o.live && o.node != "" {
				held[o.node] = true
			}
		})
		if held[a.node] && len(held) < hint {
			return duplicate
		}
	}
	s.live, s.node, s.nodes, s.session, s.since, s.lastErr = true, a.node, a.nodes, a.session, time.Now(), ""
	b.updateHint()
	return keep
}

// release records that s's session ended, and why.
func (b *book) release(s *slot, cause string) {
	s.live, s.node, s.nodes, s.session, s.since, s.lastErr = false, "", 0, "", time.Time{}, cause
	b.updateHint()
}

// remove drops s, whose goroutine has ended.
func (b *book) remove(s *slot) {
	b.slots = slices.DeleteFunc(b.slots, func(o *slot) bool { return o == s })
	b.updateHint()
}

// distinct counts the nodes the active slots' sessions landed on.
func (b *book) distinct() int {
	held := map[string]bool{}
	b.active(func(s *slot) {
		if s.live && s.node != "" {
			held[s.node] = true
		}
	})
	return len(held)
}

// updateHint takes the node count from the live sessions; with none up it
// keeps the last one known, so extras keep dialing while nodes restart.
func (b *book) updateHint() {
	hint, live := 0, false
	b.active(func(s *slot) {
		if s.live {
			live = true
			hint = max(hint, s.nodes)
		}
	})
	if live {
		b.hint = hint
	}
}
