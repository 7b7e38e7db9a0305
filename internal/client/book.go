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
	session string    // the live session's id
	since   time.Time // when the live session came up
	lastErr string    // why the last attempt or session ended
}

// book is a target's slots and the nodes their sessions landed on: the
// decisions of discovery and of the node count hint, apart from the
// network. Not safe for concurrent use: the group's mu guards it.
type book struct {
	slots []*slot // in creation order; retired ones until their goroutine ends
	// hint is the node count of the newest answer from the servers,
	// whether its session was kept or not, and whichever sessions are up
	// since: an older answer never outvotes a newer one, and retiring a
	// session changes nothing.
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
// new address and retires the slots of vanished ones. Extras stay: one
// whose session went through a vanished address keeps it until it ends
// (the node may well still be there), then dials through one that is left.
func (b *book) syncAddrs(addrs []string) (added, retire []*slot) {
	want := make(map[string]bool, len(addrs))
	for _, a := range addrs {
		want[a] = true
	}
	have := map[string]bool{}
	b.active(func(s *slot) {
		switch {
		case s.extra:
		case !want[s.addr]:
			s.retired = true
			retire = append(retire, s)
		default:
			have[s.addr] = true
		}
	})
	for _, a := range addrs {
		if !have[a] {
			have[a] = true
			s := &slot{addr: a}
			b.slots = append(b.slots, s)
			added = append(added, s)
		}
	}
	return added, retire
}

// planExtras says which extra slots to add, or to retire, so that address
// slots and extras together are as many as the servers' node count, never
// more: extras only make up for address slots a load balancer hides. An
// extra is added only while no other is looking for a node (not up): with
// a node count that cannot be reached, one slot keeps looking, not one per
// missing node.
func (b *book) planExtras() (added, retire []*slot) {
	var addrSlots, looking int
	var extras []*slot
	b.active(func(s *slot) {
		switch {
		case !s.extra:
			addrSlots++
		case !s.live:
			looking++
			fallthrough
		default:
			extras = append(extras, s)
		}
	})
	want := 0
	if b.hint > 0 {
		want = max(0, b.hint-addrSlots)
	}
	if len(extras) < want && looking == 0 {
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
// addresses in turn. ok is false for an extra when the group has no
// address (it then waits, rather than dial the name through the system's
// resolver).
func (b *book) via(s *slot) (addr string, ok bool) {
	if !s.extra {
		s.via = s.addr
		return s.via, true
	}
	addrs := b.addresses()
	if len(addrs) == 0 {
		return "", false
	}
	s.via = addrs[s.turn%len(addrs)]
	s.turn++
	return s.via, true
}

// round is how many sessions in a row s may see land on held nodes before
// it pauses: one through each address, and at least one per node, so a
// balancer handing connections out in turn shows it every node.
func (b *book) round() int {
	return max(1, len(b.addresses()), b.hint)
}

// verdict is what admit decides about a new session.
type verdict int

const (
	keep      verdict = iota // s is live
	duplicate                // landed on a node the target holds while another is missing: close it, retry soon
	redundant                // landed on a node the target holds, none missing (or no count known): close it, retry late
	unwanted                 // s was retired meanwhile: close it, stop
)

// admit decides on a session of s that went through via and landed on
// a.node, whose answer becomes the node count. A session on a node that
// another session of the target holds is not kept: retrying may land on
// a missing node (duplicate), and while none is missing or no count is
// known (an IPv4 and an IPv6 address of one node, a balancer's several
// addresses) a second session to a node only costs it memory (redundant).
// An answer without a node name (a server before X-Wsp-Node) is kept.
func (b *book) admit(s *slot, via string, a answer) verdict {
	s.via = via
	b.hint = a.nodes
	if s.retired {
		return unwanted
	}
	if a.node != "" {
		held := map[string]bool{}
		b.active(func(o *slot) {
			if o != s && o.live && o.node != "" {
				held[o.node] = true
			}
		})
		if held[a.node] {
			if len(held) < b.hint {
				return duplicate
			}
			return redundant
		}
	}
	s.live, s.node, s.session, s.since, s.lastErr = true, a.node, a.session, time.Now(), ""
	return keep
}

// release records that s's session ended, and why.
func (b *book) release(s *slot, cause string) {
	s.live, s.node, s.session, s.since, s.lastErr = false, "", "", time.Time{}, cause
}

// remove drops s, whose goroutine has ended.
func (b *book) remove(s *slot) {
	b.slots = slices.DeleteFunc(b.slots, func(o *slot) bool { return o == s })
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

// anyLive reports whether a session of an active slot other than s is up.
func (b *book) anyLive(s *slot) bool {
	live := false
	b.active(func(o *slot) {
		live = live || (o != s && o.live)
	})
	return live
}
