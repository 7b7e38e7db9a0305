package client

import (
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"

	"wsp/internal/tunnel"
)

func TestParseAnswer(t *testing.T) {
	tests := []struct {
		name  string
		hdr   map[string]string
		want  answer
		nodes int
	}{
		{"old server", map[string]string{tunnel.HeaderSession: "s1"}, answer{session: "s1"}, 0},
		{"node only", map[string]string{tunnel.HeaderNode: "n1"}, answer{node: "n1"}, 0},
		{"node count", map[string]string{tunnel.HeaderNode: "n1", tunnel.HeaderNodes: "3"}, answer{node: "n1", nodes: 3}, 3},
		{"count with spaces", map[string]string{tunnel.HeaderNodes: " 2 "}, answer{nodes: 2}, 2},
		{"count zero", map[string]string{tunnel.HeaderNodes: "0"}, answer{}, 0},
		{"count negative", map[string]string{tunnel.HeaderNodes: "-4"}, answer{}, 0},
		{"count garbage", map[string]string{tunnel.HeaderNodes: "3abc"}, answer{}, 0},
		{"count capped", map[string]string{tunnel.HeaderNodes: "100000"}, answer{nodes: maxNodesHint}, maxNodesHint},
		{"long node name", map[string]string{tunnel.HeaderNode: strings.Repeat("n", 500)}, answer{node: strings.Repeat("n", maxNodeName)}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := http.Header{}
			for k, v := range tt.hdr {
				h.Set(k, v)
			}
			if got := parseAnswer(h); got != tt.want {
				t.Errorf("parseAnswer(%v) = %+v, want %+v", tt.hdr, got, tt.want)
			}
		})
	}
}

func TestNormalizeAddrs(t *testing.T) {
	tests := []struct {
		raw     []string
		want    []string
		dropped int
	}{
		{nil, nil, 0},
		{[]string{"10.0.0.2", "10.0.0.1", "10.0.0.2"}, []string{"10.0.0.1", "10.0.0.2"}, 0},
		{[]string{"::ffff:10.0.0.1", "10.0.0.1"}, []string{"10.0.0.1"}, 0},
		{[]string{"not-an-ip", "2001:db8::1", "10.0.0.9"}, []string{"10.0.0.9", "2001:db8::1"}, 0},
	}
	for _, tt := range tests {
		got, dropped := normalizeAddrs(tt.raw)
		if !slices.Equal(got, tt.want) || dropped != tt.dropped {
			t.Errorf("normalizeAddrs(%q) = %q, %d; want %q, %d", tt.raw, got, dropped, tt.want, tt.dropped)
		}
	}
	var many []string
	for i := range maxAddresses + 10 {
		many = append(many, fmt.Sprintf("10.0.%d.%d", i/256, i%256))
	}
	got, dropped := normalizeAddrs(many)
	if len(got) != maxAddresses || dropped != 10 || got[0] != "10.0.0.0" {
		t.Errorf("normalizeAddrs of %d addresses kept %d (first %s), dropped %d", len(many), len(got), got[0], dropped)
	}
}

func TestIsIPLiteral(t *testing.T) {
	for host, want := range map[string]bool{
		"127.0.0.1":        true,
		"::1":              true,
		"fe80::1%eth0":     true,
		"nodes.wsp.test":   false,
		"localhost":        false,
		"wsp-0.wsp.ns.svc": false,
		"":                 false,
	} {
		if got := isIPLiteral(host); got != want {
			t.Errorf("isIPLiteral(%q) = %v, want %v", host, got, want)
		}
	}
}

// addrsOf lists the addresses of slots, "+" for an extra.
func addrsOf(slots []*slot) []string {
	var out []string
	for _, s := range slots {
		if s.extra {
			out = append(out, "+")
		} else {
			out = append(out, s.addr)
		}
	}
	return out
}

func TestSyncAddrs(t *testing.T) {
	var b book
	added, retire := b.syncAddrs([]string{"10.0.0.1", "10.0.0.2", "10.0.0.3"})
	if got := addrsOf(added); !slices.Equal(got, []string{"10.0.0.1", "10.0.0.2", "10.0.0.3"}) || len(retire) != 0 {
		t.Fatalf("first answer: added %q, retired %q", got, addrsOf(retire))
	}
	// The same answer changes nothing.
	if added, retire := b.syncAddrs([]string{"10.0.0.1", "10.0.0.2", "10.0.0.3"}); len(added)+len(retire) != 0 {
		t.Fatalf("same answer: added %q, retired %q", addrsOf(added), addrsOf(retire))
	}
	// .2 goes, .4 comes.
	added, retire = b.syncAddrs([]string{"10.0.0.1", "10.0.0.3", "10.0.0.4"})
	if !slices.Equal(addrsOf(added), []string{"10.0.0.4"}) || !slices.Equal(addrsOf(retire), []string{"10.0.0.2"}) {
		t.Fatalf("changed answer: added %q, retired %q", addrsOf(added), addrsOf(retire))
	}
	if !retire[0].retired {
		t.Error("the vanished address's slot is not marked retired")
	}
	if got := b.addresses(); !slices.Equal(got, []string{"10.0.0.1", "10.0.0.3", "10.0.0.4"}) {
		t.Errorf("addresses = %q", got)
	}
	// .2 comes back while its old slot still drains: a new slot.
	added, _ = b.syncAddrs([]string{"10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"})
	if !slices.Equal(addrsOf(added), []string{"10.0.0.2"}) || added[0] == retire[0] {
		t.Fatalf("address back: added %q", addrsOf(added))
	}
	b.remove(retire[0])
	if n := len(b.slots); n != 4 {
		t.Errorf("%d slots after the drained one is removed, want 4", n)
	}
}

// An extra whose session went through a vanished address keeps it until
// it ends: the node behind may well still be there.
func TestSyncAddrsKeepsExtras(t *testing.T) {
	var b book
	b.syncAddrs([]string{"10.0.0.1", "10.0.0.2"})
	through2 := &slot{extra: true, live: true, via: "10.0.0.2", node: "b"}
	dialing := &slot{extra: true, via: "10.0.0.2"}
	b.slots = append(b.slots, through2, dialing)
	_, retire := b.syncAddrs([]string{"10.0.0.1"})
	if !slices.Equal(retire, []*slot{b.slots[1]}) {
		t.Fatalf("retired %q, want the slot of 10.0.0.2 alone", addrsOf(retire))
	}
	if through2.retired || dialing.retired {
		t.Error("retired an extra because of the address it went through")
	}
	// Once its session ends it dials through an address that is left.
	b.release(through2, "lost")
	if via, ok := b.via(through2); via != "10.0.0.1" || !ok {
		t.Errorf("the extra dials %q, %v next, want 10.0.0.1", via, ok)
	}
}

// extrasOf lists the active extras of b.
func extrasOf(b *book) []*slot {
	var out []*slot
	b.active(func(s *slot) {
		if s.extra {
			out = append(out, s)
		}
	})
	return out
}

func TestPlanExtras(t *testing.T) {
	var b book
	b.syncAddrs([]string{"10.0.0.1"}) // one address: a load balancer
	if added, retire := b.planExtras(); len(added)+len(retire) != 0 {
		t.Fatalf("without a node count: added %d, retired %d", len(added), len(retire))
	}
	lb := b.slots[0]
	if v := b.admit(lb, "10.0.0.1", answer{node: "a", nodes: 3}); v != keep {
		t.Fatalf("first session: %v", v)
	}
	// Node count 3 through one address: two extras, one at a time.
	first, _ := b.planExtras()
	if len(first) != 1 || !first[0].extra {
		t.Fatalf("node count 3 through one address: added %q, want one extra", addrsOf(first))
	}
	if added, retire := b.planExtras(); len(added)+len(retire) != 0 {
		t.Fatalf("planning again while the extra looks: added %d, retired %d", len(added), len(retire))
	}
	b.admit(first[0], "10.0.0.1", answer{node: "b", nodes: 3})
	second, _ := b.planExtras()
	if len(second) != 1 {
		t.Fatalf("once the first extra is up: added %d, want the second", len(second))
	}
	if added, _ := b.planExtras(); len(added) != 0 {
		t.Fatalf("beyond the node count: added %d", len(added))
	}
	// The servers then say 2 nodes: the extra without a session goes first.
	b.admit(lb, "10.0.0.1", answer{node: "a", nodes: 2})
	if b.hint != 2 {
		t.Fatalf("hint = %d after the newest answer said 2", b.hint)
	}
	_, retire := b.planExtras()
	if !slices.Equal(retire, []*slot{second[0]}) {
		t.Fatalf("node count 2: retired %v, want the extra without a session", retire)
	}
	if b.hint != 2 {
		t.Fatalf("hint = %d after retiring an extra, want 2 still", b.hint)
	}
	// Discovery finds 3 addresses: no extra is needed any more.
	if _, retire := b.syncAddrs([]string{"10.0.0.1", "10.0.0.2", "10.0.0.3"}); len(retire) != 0 {
		t.Fatalf("more addresses retired %v", retire)
	}
	if _, retire := b.planExtras(); !slices.Equal(retire, []*slot{first[0]}) {
		t.Fatalf("as many addresses as nodes: retired %v, want the last extra", retire)
	}
}

// However many extras a node count asks for, they are added one at a time,
// each once the one before is up, and never beyond the count.
func TestPlanExtrasNeverBeyondNodeCount(t *testing.T) {
	for _, tt := range []struct{ addrs, hint, want int }{
		{1, 0, 0}, {1, 1, 0}, {1, 3, 2}, {2, 3, 1}, {3, 3, 0}, {5, 3, 0}, {1, maxNodesHint, maxNodesHint - 1},
	} {
		var b book
		var addrs []string
		for i := range tt.addrs {
			addrs = append(addrs, fmt.Sprintf("10.0.0.%d", i+1))
		}
		b.syncAddrs(addrs)
		b.hint = tt.hint
		for i := 0; ; i++ {
			added, _ := b.planExtras()
			if len(added) == 0 {
				break
			}
			if len(added) > 1 {
				t.Fatalf("%d addresses, %d nodes: %d extras added at once", tt.addrs, tt.hint, len(added))
			}
			added[0].live, added[0].node = true, fmt.Sprint("n", i)
		}
		if got := len(extrasOf(&b)); got != tt.want {
			t.Errorf("%d addresses, %d nodes: %d extras, want %d", tt.addrs, tt.hint, got, tt.want)
		}
	}
}

// With a node count the live nodes never reach, one extra looks for the
// missing nodes, not one per missing node; an extra whose session ended
// looks again beside it.
func TestPlanExtrasOneLooking(t *testing.T) {
	var b book
	b.syncAddrs([]string{""})
	b.admit(b.slots[0], "", answer{node: "a", nodes: 10})
	e1, _ := b.planExtras()
	b.admit(e1[0], "", answer{node: "b", nodes: 10})
	e2, _ := b.planExtras()
	for range 5 {
		if added, _ := b.planExtras(); len(added) != 0 {
			t.Fatalf("added %d extras while one looks", len(added))
		}
	}
	if n := len(b.slots); n != 3 {
		t.Fatalf("%d slots for 2 live nodes and a count of 10, want 3", n)
	}
	b.release(e1[0], "lost")
	if added, _ := b.planExtras(); len(added) != 0 {
		t.Fatalf("added %d extras while two look", len(added))
	}
	if e2[0].retired || e1[0].retired {
		t.Error("an extra looking was retired")
	}
}

func TestAdmit(t *testing.T) {
	// Slots as the book holds them: an address slot ("10.0.0.1", "" for
	// the target as given) or an extra ("+"), up on a node or not ("").
	type sl struct{ addr, node string }
	tests := []struct {
		name  string
		slots []sl // the last one without a node is the one admitting
		node  string
		nodes int
		want  verdict
	}{
		{"no node count: a second session on a node is redundant",
			[]sl{{"", "a"}, {"+", ""}}, "a", 0, redundant},
		{"two addresses of one node, no node count (IPv4 and IPv6)",
			[]sl{{"127.0.0.1", "a"}, {"::1", ""}}, "a", 0, redundant},
		{"no node count: another node",
			[]sl{{"10.0.0.1", "a"}, {"10.0.0.2", ""}}, "b", 0, keep},
		{"extra on a held node while nodes are missing",
			[]sl{{"", "a"}, {"+", ""}}, "a", 3, duplicate},
		{"extra on a new node",
			[]sl{{"", "a"}, {"+", ""}}, "b", 3, keep},
		{"every node reached: nothing better to find",
			[]sl{{"", "a"}, {"+", "b"}, {"+", ""}}, "a", 2, redundant},
		{"address slot behind a load balancer",
			[]sl{{"10.0.0.1", "a"}, {"10.0.0.2", ""}}, "a", 3, duplicate},
		{"two addresses on one node while a node is missing",
			[]sl{{"10.0.0.1", "a"}, {"10.0.0.2", ""}, {"10.0.0.3", "c"}}, "a", 3, duplicate},
		{"more addresses than nodes, every node held",
			[]sl{{"10.0.0.1", "a"}, {"10.0.0.2", "b"}, {"10.0.0.3", ""}}, "a", 2, redundant},
		{"a server without a name",
			[]sl{{"", "a"}, {"+", ""}}, "", 3, keep},
		{"the first session",
			[]sl{{"", ""}}, "a", 3, keep},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var b book
			var s *slot
			for _, x := range tt.slots {
				o := &slot{addr: x.addr, extra: x.addr == "+"}
				if x.node != "" {
					o.live, o.node = true, x.node
				} else {
					s = o
				}
				b.slots = append(b.slots, o)
			}
			got := b.admit(s, "10.9.9.9", answer{node: tt.node, nodes: tt.nodes, session: "x"})
			if got != tt.want {
				t.Fatalf("admit = %v, want %v", got, tt.want)
			}
			if s.live != (got == keep) {
				t.Errorf("live = %v after %v", s.live, got)
			}
			if s.via != "10.9.9.9" {
				t.Errorf("via = %q, want the address dialed", s.via)
			}
			if b.hint != tt.nodes {
				t.Errorf("hint = %d, want the answer's %d", b.hint, tt.nodes)
			}
		})
	}
}

func TestAdmitRetiredSlot(t *testing.T) {
	var b book
	added, _ := b.syncAddrs([]string{"10.0.0.1"})
	b.syncAddrs(nil)
	if v := b.admit(added[0], "10.0.0.1", answer{node: "a"}); v != unwanted {
		t.Fatalf("admit on a retired slot = %v, want unwanted", v)
	}
	if added[0].live {
		t.Error("a retired slot went live")
	}
}

// The node count is the newest answer's, not the largest among the
// sessions up: an older session still up does not outvote it, nor does a
// session's end or an extra's retirement bring an older count back. With
// no session up the last count is kept, so extras go on dialing while
// every node restarts.
func TestHintIsNewestAnswer(t *testing.T) {
	var b book
	b.syncAddrs([]string{""})
	s := b.slots[0]
	b.admit(s, "", answer{node: "a", nodes: 3})
	e1, _ := b.planExtras()
	b.admit(e1[0], "", answer{node: "b", nodes: 3})
	e2, _ := b.planExtras()
	// A node restarted with a count of 2: its answer is the newest, even
	// as the extra's session landed on a held node and was not kept.
	if v := b.admit(e2[0], "", answer{node: "a", nodes: 2}); v != redundant {
		t.Fatalf("admit = %v, want redundant", v)
	}
	if b.hint != 2 {
		t.Fatalf("hint = %d while sessions up said 3 and the newest answer 2", b.hint)
	}
	_, retire := b.planExtras()
	if !slices.Equal(retire, []*slot{e2[0]}) {
		t.Fatalf("retired %v, want the extra without a session", retire)
	}
	if b.hint != 2 {
		t.Fatalf("hint = %d after an extra was retired", b.hint)
	}
	b.remove(e2[0])
	b.release(s, "lost")
	b.release(e1[0], "lost")
	if b.hint != 2 {
		t.Fatalf("hint = %d with no session up, want the last known 2", b.hint)
	}
	if added, retire := b.planExtras(); len(added)+len(retire) != 0 {
		t.Fatalf("with no session up: added %d, retired %d extras, want the one there kept", len(added), len(retire))
	}
	b.admit(s, "", answer{node: "a2"})
	if b.hint != 0 {
		t.Fatalf("hint = %d once the newest answer gives none", b.hint)
	}
	if _, retire := b.planExtras(); len(retire) != 1 {
		t.Fatalf("%d extras retired without a node count, want 1", len(retire))
	}
	if b.distinct() != 1 {
		t.Errorf("distinct = %d", b.distinct())
	}
}

func TestVia(t *testing.T) {
	var b book
	e := &slot{extra: true}
	b.slots = append(b.slots, e)
	if via, ok := b.via(e); ok {
		t.Errorf("an extra with no address dials %q, want it to wait", via)
	}
	b.syncAddrs([]string{"10.0.0.2", "10.0.0.1"})
	if got, ok := b.via(b.slots[1]); got != "10.0.0.2" || !ok {
		t.Errorf("address slot dials %q, %v", got, ok)
	}
	var got []string
	for range 4 {
		v, _ := b.via(e)
		got = append(got, v)
	}
	if want := []string{"10.0.0.1", "10.0.0.2", "10.0.0.1", "10.0.0.2"}; !slices.Equal(got, want) {
		t.Errorf("extra dials %q, want %q", got, want)
	}
	// The target as given: its one address slot dials "", and so do extras.
	var g book
	g.syncAddrs([]string{""})
	if v, ok := g.via(e); v != "" || !ok {
		t.Errorf("extra of a target dialed as given: %q, %v", v, ok)
	}
}

func TestRound(t *testing.T) {
	for _, tt := range []struct{ addrs, hint, want int }{{1, 0, 1}, {1, 3, 3}, {4, 3, 4}, {2, 0, 2}} {
		var b book
		var addrs []string
		for i := range tt.addrs {
			addrs = append(addrs, fmt.Sprintf("10.0.0.%d", i+1))
		}
		b.syncAddrs(addrs)
		b.hint = tt.hint
		if got := b.round(); got != tt.want {
			t.Errorf("%d addresses, %d nodes: round %d, want %d", tt.addrs, tt.hint, got, tt.want)
		}
	}
}

func TestCauseClass(t *testing.T) {
	same := [][2]string{ // {cause, via}
		{"dial tcp 10.0.0.1:8080: connect: connection refused", "10.0.0.1"},
		{"dial tcp 10.0.0.2:8080: connect: connection refused", "10.0.0.2"},
		{"dial tcp [2001:db8::1]:8080: connect: connection refused", "2001:db8::1"},
		{"dial tcp [fe80::1%eth0]:8080: connect: connection refused", ""},
		{"dial tcp 192.168.1.1:443: connect: connection refused", ""},
	}
	want := causeClass(same[0][0], same[0][1])
	for _, c := range same[1:] {
		if got := causeClass(c[0], c[1]); got != want {
			t.Errorf("causeClass(%q) = %q, want %q", c[0], got, want)
		}
	}
	if causeClass("dial tcp 10.0.0.1:8080: i/o timeout", "10.0.0.1") == want {
		t.Error("two different causes share a class")
	}
	if got := causeClass("server refused registration: 401 Unauthorized: bad token", "::1"); got != "server refused registration: 401 Unauthorized: bad token" {
		t.Errorf("a cause without an address changed: %q", got)
	}
}
