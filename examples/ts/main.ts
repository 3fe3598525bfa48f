// Gets an access token from an API key and calls protected methods through the
// exchange's edge (Envoy): the caller's account and its balances, and with
// --place-order a limit order that it then cancels. gRPC over
// HTTP/2 by default; --grpc-web speaks gRPC-Web (what a browser uses, with
// @connectrpc/connect-web's transport instead of connect-node's).
//
//   export CEX_API_KEY_ID=ak_... CEX_API_KEY_SECRET=sk_...
//   node dist/examples/ts/main.js --target 127.0.0.1:50050
//
// Each result is printed as one JSON line; a failed call prints its code and
// message on stderr and exits 1.
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, type Interceptor, type Transport } from "@connectrpc/connect";
import { createGrpcTransport, createGrpcWebTransport } from "@connectrpc/connect-node";
import { parseArgs } from "node:util";

import { AuthService } from "../../gen/ts/cex/auth/v1/auth_pb.js";
import { LedgerService } from "../../gen/ts/cex/ledger/v1/ledger_pb.js";
import { OrderService } from "../../gen/ts/cex/order/v1/order_pb.js";
import { OrderState, OrderType, Side, TimeInForce } from "../../gen/ts/cex/type/v1/types_pb.js";

const { values: args } = parseArgs({
  options: {
    target: { type: "string", default: process.env.CEX_TARGET ?? "127.0.0.1:50050" },
    "grpc-web": { type: "boolean", default: false },
    "timeout-ms": { type: "string", default: "10000" },
    "place-order": { type: "boolean", default: false },
    market: { type: "string", default: "BTC-USDT" },
    price: { type: "string", default: "95.5" },
    quantity: { type: "string", default: "0.1" },
  },
});
const keyId = process.env.CEX_API_KEY_ID;
const secret = process.env.CEX_API_KEY_SECRET;
if (!keyId || !secret) {
  console.error("set CEX_API_KEY_ID and CEX_API_KEY_SECRET (cex apikey create prints them)");
  process.exit(2);
}
const timeoutMs = Number(args["timeout-ms"]);

/** Exchanges the API key for a JWT and renews it a minute (or a fifth of its life) before expiry. */
class TokenSource {
  private token = "";
  private renewAt = 0;
  accountId = "";

  constructor(
    private readonly auth: ReturnType<typeof createClient<typeof AuthService>>,
    private readonly keyId: string,
    private readonly secret: string,
  ) {}

  async get(): Promise<string> {
    if (!this.token || Date.now() >= this.renewAt) {
      const reply = await this.auth.issueToken(
        { apiKeyId: this.keyId, apiKeySecret: this.secret },
        { timeoutMs },
      );
      const expires = reply.expireTime ? timestampDate(reply.expireTime).getTime() : Date.now();
      const margin = Math.min(60_000, (expires - Date.now()) / 5);
      this.token = reply.accessToken;
      this.renewAt = expires - margin;
      this.accountId = reply.accountId;
    }
    return this.token;
  }

  /** Adds `authorization: Bearer <token>` to every call made through it. */
  interceptor(): Interceptor {
    return (next) => async (request) => {
      request.header.set("authorization", `Bearer ${await this.get()}`);
      return next(request);
    };
  }
}

function transport(interceptors: Interceptor[]): Transport {
  const baseUrl = `http://${args.target}`; // the local edge is plaintext; use https:// in production
  return args["grpc-web"]
    ? createGrpcWebTransport({ baseUrl, httpVersion: "1.1", interceptors })
    : createGrpcTransport({ baseUrl, interceptors, pingIntervalMs: 30_000 });
}

async function main(): Promise<void> {
  const tokens = new TokenSource(createClient(AuthService, transport([])), keyId!, secret!);
  const authed = transport([tokens.interceptor()]);
  const auth = createClient(AuthService, authed);
  const ledger = createClient(LedgerService, authed);

  await tokens.get();
  const { account } = await auth.getAccount({ accountId: tokens.accountId }, { timeoutMs });
  console.log(JSON.stringify({ account_id: account?.accountId, state: account?.state }));

  const { balances } = await ledger.getBalances({}, { timeoutMs });
  console.log(
    JSON.stringify({
      balances: balances.map((b) => ({ asset: b.asset, available: b.available, held: b.held })),
    }),
  );

  if (args["place-order"]) {
    // Both calls carry their idempotency ids, so either may be sent again
    // after a transport failure without acting twice.
    const orders = createClient(OrderService, authed);
    const clientOrderId = `ts-example-${Date.now()}-${Math.floor(Math.random() * 1e9)}`;
    const placed = await orders.placeOrder(
      {
        clientOrderId,
        market: args.market,
        side: Side.BUY,
        type: OrderType.LIMIT,
        timeInForce: TimeInForce.GTC,
        price: args.price,
        quantity: args.quantity,
      },
      { timeoutMs },
    );
    console.log(JSON.stringify({ placed: placed.order?.orderId, client_order_id: clientOrderId }));
    const cancelled = await orders.cancelOrder(
      { requestId: `cancel-${clientOrderId}`, orderId: placed.order?.orderId ?? "" },
      { timeoutMs },
    );
    console.log(
      JSON.stringify({
        cancelled: cancelled.order?.orderId,
        state: `ORDER_STATE_${OrderState[cancelled.order?.state ?? OrderState.UNSPECIFIED]}`,
      }),
    );
  }
}

main().catch((error: unknown) => {
  const failure = ConnectError.from(error);
  console.error(
    JSON.stringify({
      code: Code[failure.code],
      message: failure.rawMessage,
      details: failure.details.map((d) => ("type" in d ? d.type : d.desc.typeName)),
    }),
  );
  process.exit(1);
});
