//! Bookinfo through the mesh, each workload from its sample Deployment's
//! injected pod spec (in the namespace variant): the product page with its
//! details and reviews through the ingress gateway, and a user's own route.

use std::time::{Duration, Instant};

use mesh_e2e::mesh::{LocalMesh, workload};

const SUBSETS: &str = include_str!("../../samples/bookinfo/networking/destination-rule-all.yaml");
const JASON: &str =
    include_str!("../../samples/bookinfo/networking/virtual-service-reviews-jason-v2.yaml");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookinfo_serves_its_product_page_and_routes_jason_to_v2() {
    let m = LocalMesh::start(
        "bookinfo",
        &[
            ("productpage", 9080),
            ("details", 9080),
            ("ratings", 9080),
            ("reviews", 9080),
        ],
        &[
            workload("productpage-v1", "productpage", "v1", "productpage"),
            workload("details-v1", "details", "v1", "details"),
            workload("ratings-v1", "ratings", "v1", "ratings"),
            workload("reviews-v1", "reviews", "v1", "reviews"),
            workload("reviews-v2", "reviews", "v2", "reviews"),
            workload("reviews-v3", "reviews", "v3", "reviews"),
        ],
        ("/", "productpage", 9080),
    )
    .await;
    let page = m.requests("/productpage", &[], 1, 1).await.remove(0);
    assert_eq!(page.status, 200, "{page:?}");
    assert!(
        page.body.contains("<h1>The Comedy of Errors</h1>"),
        "{}",
        page.body
    );
    assert!(
        page.body.contains("PublisherA"),
        "details through the mesh: {}",
        page.body
    );
    assert!(
        page.body.contains("Reviews served by: <b>reviews-v"),
        "{}",
        page.body
    );

    m.write("subsets.yaml", SUBSETS);
    m.write("jason.yaml", JASON);
    // Applied when 20 requests in a row go where the rule says (by
    // chance under the old round robin: (1/3)^20).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let jason = m
            .requests("/productpage", &[("cookie", "user=jason")], 20, 4)
            .await;
        let others = m.requests("/productpage", &[], 20, 4).await;
        let jason_ok = jason.iter().all(|o| {
            o.body.contains("Reviews served by: <b>reviews-v2</b>") && o.body.contains("★")
        });
        let others_ok = others
            .iter()
            .all(|o| o.body.contains("Reviews served by: <b>reviews-v1</b>"));
        if jason_ok && others_ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "jason not on v2 or others not on v1: {:?}",
            jason
                .iter()
                .chain(&others)
                .map(|o| o.body.len())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
