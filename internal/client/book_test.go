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

// A live extra that went through a vanished address is retired; one that
// did not, or is not up, stays.
func TestSyncAddrsRetiresExtrasThroughVanishedAddress(t *testing.T) {
	var b book
	b.syncAddrs([]string{"10.0.0.1", "10.0.0.2"})
	through1 := &slot{extra: true, live: true, via: "10.0.0.1", node: "a", nodes: 4}
	through2 := &slot{extra: true, live: true, via: "10.0.0.2", node: "b", nodes: 4}
	dialing := &slot{extra: true, via: "10.0.0.2"}
	b.slots = append(b.slots, through1, through2, dialing)
	_, retire := b.syncAddrs([]string{"10.0.0.1"})
	if !slices.Equal(retire, []*slot{b.slots[1], through2}) {
		t.Fatalf("retired %q, want the slot of 10.0.0.2 and the extra through it", addrsOf(retire))
	}
	if through1.retired || dialing.retired {
		t.Error("retired an extra that did not go through the vanished address")
	}
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
	added, _ := b.planExtras()
	if len(added) != 2 || !added[0].extra || !added[1].extra {
		t.Fatalf("node count 3 through one address: added %q, want two extras", addrsOf(added))
	}
	if added, retire := b.planExtras(); len(added)+len(retire) != 0 {
		t.Fatalf("planning again: added %d, retired %d", len(added), len(retire))
	}
	// One extra lands; the servers then say 2 nodes: the extra without a
	// session goes first.
	up, down := added[0], added[1]
	b.admit(up, "10.0.0.1", answer{node: "b", nodes: 3})
	b.release(lb, "restart")
	b.admit(lb, "10.0.0.1", answer{node: "a", nodes: 2})
	b.release(up, "restart")
	b.admit(up, "10.0.0.1", answer{node: "b", nodes: 2})
	if b.hint != 2 {
		t.Fatalf("hint = %d after every session reported 2", b.hint)
	}
	_, retire := b.planExtras()
	if !slices.Equal(retire, []*slot{down}) {
		t.Fatalf("node count 2: retired %v, want the extra without a session", retire)
	}
	// Discovery finds 3 addresses: no extra is needed any more.
	if _, retire := b.syncAddrs([]string{"10.0.0.1", "10.0.0.2", "10.0.0.3"}); len(retire) != 0 {
		t.Fatalf("more addresses retired %v", retire)
	}
	if _, retire := b.planExtras(); !slices.Equal(retire, []*slot{up}) {
		t.Fatalf("as many addresses as nodes: retired %v, want the last extra", retire)
	}
}

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
		added, _ := b.planExtras()
		if len(added) != tt.want {
			t.Errorf("%d addresses, %d nodes: %d extras, want %d", tt.addrs, tt.hint, len(added), tt.want)
		}
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
		{"no node count: a second session on a node is kept",
			[]sl{{"", "a"}, {"+", ""}}, "a", 0, keep},
		{"extra on a held node while nodes are missing",
			[]sl{{"", "a"}, {"+", ""}}, "a", 3, duplicate},
		{"extra on a new node",
			[]sl{{"", "a"}, {"+", ""}}, "b", 3, keep},
		{"node count known from the other sessions",
			[]sl{{"", "a"}, {"+", ""}}, "a", -3, duplicate},
		{"every node reached: nothing better to find",
			[]sl{{"", "a"}, {"+", "b"}, {"+", ""}}, "a", 2, keep},
		{"address slot behind a load balancer",
			[]sl{{"10.0.0.1", "a"}, {"10.0.0.2", ""}}, "a", 3, duplicate},
		{"two addresses on one node while a node is missing",
			[]sl{{"10.0.0.1", "a"}, {"10.0.0.2", ""}, {"10.0.0.3", "c"}}, "a", 3, duplicate},
		{"more addresses than nodes, every node held",
			[]sl{{"10.0.0.1", "a"}, {"10.0.0.2", "b"}, {"10.0.0.3", ""}}, "a", 2, keep},
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
					o.live, o.node, o.nodes = true, x.node, max(tt.nodes, -tt.nodes)
				} else {
					s = o
				}
				b.slots = append(b.slots, o)
			}
			b.updateHint()
			got := b.admit(s, "10.9.9.9", answer{node: tt.node, nodes: max(tt.nodes, 0), session: "x"})
			if got != tt.want {
				t.Fatalf("admit = %v, want %v", got, tt.want)
			}
			if s.live != (got == keep) {
				t.Errorf("live = %v after %v", s.live, got)
			}
			if s.via != "10.9.9.9" {
				t.Errorf("via = %q, want the address dialed", s.via)
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

// With no session up the last node count is kept, so extras go on
// dialing while every node restarts; sessions that stop reporting one end
// it.
func TestHintKeptWhileNoneLive(t *testing.T) {
	var b book
	b.syncAddrs([]string{""})
	s := b.slots[0]
	b.admit(s, "", answer{node: "a", nodes: 3})
	b.release(s, "lost")
	if b.hint != 3 {
		t.Fatalf("hint = %d with no session up, want the last known 3", b.hint)
	}
	if added, _ := b.planExtras(); len(added) != 2 {
		t.Fatalf("%d extras planned with no session up, want 2", len(added))
	}
	b.admit(s, "", answer{node: "a2"})
	if b.hint != 0 {
		t.Fatalf("hint = %d once the live session reports none", b.hint)
	}
	if _, retire := b.planExtras(); len(retire) != 2 {
		t.Fatalf("%d extras retired without a node count, want 2", len(retire))
	}
	if b.distinct() != 1 {
		t.Errorf("distinct = %d", b.distinct())
	}
}

func TestVia(t *testing.T) {
	var b book
	b.syncAddrs([]string{"10.0.0.2", "10.0.0.1"})
	if got := b.via(b.slots[0]); got != "10.0.0.2" {
		t.Errorf("address slot dials %q", got)
	}
	e := &slot{extra: true}
	b.slots = append(b.slots, e)
	var got []string
	for range 4 {
		got = append(got, b.via(e))
	}
	if want := []string{"10.0.0.1", "10.0.0.2", "10.0.0.1", "10.0.0.2"}; !slices.Equal(got, want) {
		t.Errorf("extra dials %q, want %q", got, want)
	}
}
